"""1-bit layers: training form == inference form, straight-through gradients, and the default quantization policy."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bonsai.quant import (
    DEFAULT_KEEP,
    BinarizeConfig,
    BitConv2d,
    BitConv2dTrain,
    BitLinear,
    BitLinearTrain,
    QuantPolicy,
    plan,
    quantize_,
    to_inference_,
)

# Training and inference forms compute the same math; compare them exactly, on the reference kernel.
pytestmark = pytest.mark.usefixtures("reference_kernel")

CONFIGS = [
    BinarizeConfig(scheme, group, rank)
    for scheme in ("xnor", "mean", "onebit")
    for group in (0, 8)
    for rank in (0, 3)
    if not (scheme == "onebit" and group)
]
BLOCK_LINEARS = [
    "blocks.0.attn.qkv",
    "blocks.0.attn.proj",
    "blocks.0.cross.q",
    "blocks.0.cross.kv",
    "blocks.0.cross.proj",
    "blocks.0.mlp.fc1",
    "blocks.0.mlp.fc2",
]


def _id(c: BinarizeConfig) -> str:
    return f"{c.scheme}-g{c.group_size}-r{c.rank}"


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("config", CONFIGS, ids=_id)
def test_linear_train_and_inference_forms_agree(config: BinarizeConfig) -> None:
    g = _gen(CONFIGS.index(config))
    weight, bias = torch.randn(20, 29, generator=g), torch.randn(20, generator=g)  # K = 29: odd, partial group
    train = BitLinearTrain(weight, bias, config)
    packed = train.to_inference()
    assert isinstance(packed, BitLinear)
    assert packed.signs.dtype == torch.uint8 and not hasattr(packed, "weight")
    x = torch.randn(4, 6, 29, generator=g)
    with torch.no_grad():
        assert rel_err(packed(x), train(x)) < 1e-5


@pytest.mark.parametrize("config", CONFIGS, ids=_id)
def test_conv_train_and_inference_forms_agree(config: BinarizeConfig) -> None:
    g = _gen(100 + CONFIGS.index(config))
    with torch.random.fork_rng():
        torch.manual_seed(100 + CONFIGS.index(config))
        conv = nn.Conv2d(3, 10, kernel_size=3, stride=2, padding=1, dilation=1)  # K = 27
    train = BitConv2dTrain(conv, config)
    packed = train.to_inference()
    assert isinstance(packed, BitConv2d)
    x = torch.randn(2, 3, 9, 11, generator=g)
    with torch.no_grad():
        y_train, y_packed = train(x), packed(x)
    assert y_packed.shape == y_train.shape == (2, 10, 5, 6)
    assert rel_err(y_packed, y_train) < 1e-5


def test_conv_with_dilation_and_rectangular_kernel() -> None:
    with torch.random.fork_rng():
        torch.manual_seed(5)
        conv = nn.Conv2d(4, 6, kernel_size=(3, 2), stride=(1, 2), padding=(2, 1), dilation=(2, 1), bias=False)
    train = BitConv2dTrain(conv, BinarizeConfig("mean", 8, 2))
    x = torch.randn(1, 4, 7, 8, generator=_gen(6))
    with torch.no_grad():
        y_train, y_packed = train(x), train.to_inference()(x)
    assert y_packed.shape == y_train.shape == conv(x).shape
    assert rel_err(y_packed, y_train) < 1e-5


def test_conv_rejects_grouped_and_string_padding() -> None:
    with pytest.raises(ValueError, match="groups=1"):
        BitConv2dTrain(nn.Conv2d(4, 4, 3, groups=2), BinarizeConfig())
    with pytest.raises(ValueError, match="padding"):
        BitConv2dTrain(nn.Conv2d(4, 4, 3, padding="same"), BinarizeConfig())


@pytest.mark.parametrize("config", [c for c in CONFIGS if c.group_size == 0], ids=_id)
def test_straight_through_gradients_reach_the_latent_weight(config: BinarizeConfig) -> None:
    g = _gen(7)
    layer = BitLinearTrain(torch.randn(12, 16, generator=g), torch.randn(12, generator=g), config)
    x = torch.randn(5, 16, generator=g)
    (layer(x) * torch.randn(5, 12, generator=g)).sum().backward()
    grad = layer.weight.grad
    assert grad is not None and torch.isfinite(grad).all()
    assert (grad != 0).float().mean() > 0.5  # most weights lie inside the clip range
    assert layer.bias.grad is not None and (layer.bias.grad != 0).any()
    if config.rank:
        assert (layer.lowrank_u.grad != 0).any() and (layer.lowrank_v.grad != 0).any()


def _types(model: nn.Module) -> dict[str, str]:
    return {name: type(m).__name__ for name, m in model.named_modules()}


def test_default_policy_keeps_sensitive_layers_high_precision(make_dit) -> None:
    model = make_dit()
    names = quantize_(model, QuantPolicy())
    assert names == BLOCK_LINEARS
    types = _types(model)
    for name in BLOCK_LINEARS:
        assert types[name] == "BitLinear", name
    high_precision = {
        "patch_embed": "Conv2d",
        "time_embed.0": "Linear",
        "time_embed.2": "Linear",
        "text_proj.0": "Linear",
        "text_proj.2": "Linear",
        "pool_embed": "Linear",
        "modulation.1": "Linear",
        "final_proj": "Linear",
        "final_norm": "LayerNorm",
        "blocks.0.norm1": "LayerNorm",
        "blocks.0.norm2": "LayerNorm",
        "blocks.0.attn.q_norm": "RMSNorm",
        "blocks.0.cross.k_norm": "RMSNorm",
    }
    for name, kind in high_precision.items():
        assert types[name] == kind, name
    # no module outside the blocks' linears became 1-bit
    assert {n for n, t in types.items() if t.startswith("Bit")} == set(BLOCK_LINEARS)


def test_policy_keep_patterns_and_size_threshold(make_dit) -> None:
    model = make_dit()
    keep_mlp = QuantPolicy(keep=DEFAULT_KEEP + ("*mlp*",))
    assert plan(model, keep_mlp) == [n for n in BLOCK_LINEARS if ".mlp." not in n]
    # hidden 32: proj and q hold 32*32 = 1024 weights, the others more
    small = ("blocks.0.attn.proj", "blocks.0.cross.q", "blocks.0.cross.proj")
    assert plan(model, QuantPolicy(min_params=1025)) == [n for n in BLOCK_LINEARS if n not in small]


def test_quantized_dit_train_form_converts_to_identical_inference_form(make_dit, make_inputs) -> None:
    policy = QuantPolicy(BinarizeConfig("onebit", 0, 2))
    train_model = make_dit()
    assert quantize_(train_model, policy, form="train") == BLOCK_LINEARS
    assert all(isinstance(train_model.get_submodule(n), BitLinearTrain) for n in BLOCK_LINEARS)
    x, t, text, mask = make_inputs()
    with torch.no_grad():
        y_train = train_model(x, t, text, mask)
    assert to_inference_(train_model) == BLOCK_LINEARS
    assert {n for n, m in train_model.named_modules() if isinstance(m, (BitLinearTrain, BitConv2dTrain))} == set()
    assert all(isinstance(train_model.get_submodule(n), BitLinear) for n in BLOCK_LINEARS)
    with torch.no_grad():
        y_packed = train_model(x, t, text, mask)
    assert rel_err(y_packed, y_train) < 1e-5
    # post-training binarization of the same float model gives the same packed model
    direct = make_dit()
    quantize_(direct, policy)
    with torch.no_grad():
        assert rel_err(direct(x, t, text, mask), y_train) < 1e-5


def test_to_inference_converts_convolutions_too() -> None:
    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.SiLU(), nn.Conv2d(16, 8, 3, padding=1))
    assert quantize_(model, QuantPolicy(min_params=1), form="train") == ["0", "2"]
    x = torch.randn(1, 8, 6, 6, generator=_gen(10))
    with torch.no_grad():
        y_train = model(x)
        assert to_inference_(model) == ["0", "2"]
        assert isinstance(model[0], BitConv2d) and isinstance(model[2], BitConv2d)
        assert rel_err(model(x), y_train) < 1e-5
