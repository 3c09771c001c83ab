"""LoRA on a 1-bit model: both file layouts, exact float64 reference, weights, stacking, errors."""

from __future__ import annotations

import pytest
import torch
from diffusers_tiny import tiny_model
from safetensors.torch import save_file

from bonsai.convert import quantize_model
from bonsai.diffusers import load_bonsai_unet
from bonsai.kernels.dispatch import REFERENCE, set_kernel
from bonsai.lora import (LoRAError, LoRALayer, apply_lora, loaded_loras, parse_prompt_loras, read_lora, remove_lora,
                         set_lora_weights, use_prompt_loras)
from bonsai.quant import BitLinear

ATTN = "down_blocks.0.attentions.0.transformer_blocks.0"
TARGETS = {  # module -> (in, out, conv kernel or None)
    f"{ATTN}.attn1.to_q": (32, 32, None),  # 1-bit
    f"{ATTN}.ff.net.2": (128, 32, None),  # 1-bit
    "down_blocks.0.attentions.0.proj_in": (32, 32, (1, 1)),  # kept float (Conv2d 1x1)
}


@pytest.fixture(autouse=True)
def reference_kernel():
    """The compiled CPU kernel trades a little precision for speed; the exactness checks use the reference."""
    set_kernel(REFERENCE.name)
    yield
    set_kernel(None)


@pytest.fixture(scope="module")
def bit_unet(tmp_path_factory):
    d = tmp_path_factory.mktemp("unet")
    tiny_model("sd15").save_pretrained(d / "unet")
    quantize_model(d / "unet", d / "u.safetensors", progress=False)
    return d / "u.safetensors"


def random_factors(rank: int = 4, alpha: float = 2.0, seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, (k, n, kernel) in TARGETS.items():
        down, up = torch.randn(rank, k, generator=g) / k**0.5, torch.randn(n, rank, generator=g)
        if kernel:
            down, up = down[:, :, None, None], up[:, :, None, None]
        out[name] = (down, up, alpha)
    return out


def write_peft(path, factors) -> None:
    state = {}
    for name, (down, up, alpha) in factors.items():
        state[f"unet.{name}.lora_A.weight"], state[f"unet.{name}.lora_B.weight"] = down, up
        state[f"unet.{name}.alpha"] = torch.tensor(alpha)
    save_file(state, path)


def write_kohya(path, factors) -> None:
    state = {}
    for name, (down, up, alpha) in factors.items():
        key = "lora_unet_" + name.replace(".", "_")
        state[f"{key}.lora_down.weight"], state[f"{key}.lora_up.weight"] = down, up
        state[f"{key}.alpha"] = torch.tensor(alpha)
    state["lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"] = torch.randn(4, 8)  # text-encoder part: skipped
    save_file(state, path)


def reference(layer: LoRALayer, x: torch.Tensor, weight: float, factors) -> torch.Tensor:
    """float64: base(x) + weight * alpha/r * x down^T up^T with the bf16-stored factors."""
    down, up, alpha = factors
    d, u = down.to(torch.bfloat16).double(), up.to(torch.bfloat16).double()
    base = layer.base
    if isinstance(base, BitLinear):
        y = x.double() @ base.packed.dequantize(torch.float64).T + (0 if base.bias is None else base.bias.double())
        return y + weight * alpha / d.shape[0] * (x.double() @ d.T @ u.T)
    y = torch.nn.functional.conv2d(x.double(), base.weight.double(), base.bias.double())
    return y + weight * alpha / d.shape[0] * torch.nn.functional.conv2d(torch.nn.functional.conv2d(x.double(), d), u)


def run(unet, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, text = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 5, 32, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([300]), text).sample


@pytest.mark.parametrize("fmt", ["peft", "kohya"])
def test_lora_matches_float64_reference(bit_unet, tmp_path, fmt):
    factors = random_factors()
    path = tmp_path / "style.safetensors"
    (write_peft if fmt == "peft" else write_kohya)(path, factors)
    unet = load_bonsai_unet(bit_unet)
    before = run(unet)
    assert apply_lora(unet, path, weight=1.0) == "style"
    for name, f in factors.items():
        layer = unet.get_submodule(name)
        assert isinstance(layer, LoRALayer)
        x = torch.randn(3, f[0].shape[1], 4, 4) if f[0].dim() == 4 else torch.randn(3, 5, f[0].shape[1])
        with torch.no_grad():
            got = layer(x)
        ref = reference(layer, x, 1.0, f)
        assert ((got.double() - ref).norm() / ref.norm()).item() < 1e-5
    assert isinstance(unet.get_submodule(f"{ATTN}.attn1.to_q").base, BitLinear)  # still packed
    after = run(unet)
    assert not torch.allclose(after, before)
    set_lora_weights(unet, {"style": 0.0})
    assert torch.equal(run(unet), before)  # weight 0: the model is unchanged
    set_lora_weights(unet, {"style": 1.0})
    assert torch.equal(run(unet), after)
    remove_lora(unet, "style")
    assert torch.equal(run(unet), before)


def test_formats_agree_and_stack(bit_unet, tmp_path):
    f1, f2 = random_factors(seed=1), random_factors(rank=2, alpha=1.0, seed=2)
    write_peft(tmp_path / "a.safetensors", f1)
    write_kohya(tmp_path / "a_kohya.safetensors", f1)
    write_kohya(tmp_path / "b.safetensors", f2)
    u1, u2 = load_bonsai_unet(bit_unet), load_bonsai_unet(bit_unet)
    apply_lora(u1, tmp_path / "a.safetensors", 0.8)
    apply_lora(u2, tmp_path / "a_kohya.safetensors", 0.8, name="a")
    assert torch.equal(run(u1), run(u2))
    apply_lora(u1, tmp_path / "b.safetensors", 0.5)
    assert loaded_loras(u1) == {"a": 0.8, "b": 0.5}
    layer = u1.get_submodule(f"{ATTN}.ff.net.2")
    x = torch.randn(2, 128)
    with torch.no_grad():
        got = layer(x).double()
    both = reference(layer, x, 0.8, f1[f"{ATTN}.ff.net.2"]) + 0.5 * 1.0 / 2 * (
        x.double() @ f2[f"{ATTN}.ff.net.2"][0].to(torch.bfloat16).double().T @ f2[f"{ATTN}.ff.net.2"][1].to(torch.bfloat16).double().T)
    assert ((got - both).norm() / both.norm()).item() < 1e-5


def test_prompt_syntax(bit_unet, tmp_path):
    assert parse_prompt_loras("a cat <lora:ink:0.8> on a mat <lora:style>") == ("a cat on a mat", [("ink", 0.8), ("style", 1.0)])
    for weight in ("lots", "nan", "inf", "-Infinity", "1e999"):  # float() takes all but the first: black images
        with pytest.raises(LoRAError, match=f"bad LoRA weight in '<lora:ink:{weight}>'"):
            parse_prompt_loras(f"a cat <lora:ink:{weight}>")
    assert parse_prompt_loras("<lora:ink:-0.5> x <lora:b:1e-3>")[1] == [("ink", -0.5), ("b", 0.001)]
    write_peft(tmp_path / "ink.safetensors", random_factors())
    unet = load_bonsai_unet(bit_unet)
    before = run(unet)
    restore = use_prompt_loras(unet, [("ink", 0.8)], tmp_path)
    assert loaded_loras(unet) == {"ink": 0.8} and restore == {"ink": 0.0}
    assert not torch.equal(run(unet), before)
    set_lora_weights(unet, restore)
    assert loaded_loras(unet) == {"ink": 0.0} and torch.equal(run(unet), before)
    with pytest.raises(LoRAError, match="not found"):
        use_prompt_loras(unet, [("missing", 1.0)], tmp_path)


def test_lora_for_another_model(bit_unet, tmp_path):
    unet = load_bonsai_unet(bit_unet)
    before = run(unet)
    save_file({"transformer.single_transformer_blocks.0.proj_mlp.lora_A.weight": torch.randn(4, 32),
               "transformer.single_transformer_blocks.0.proj_mlp.lora_B.weight": torch.randn(32, 4)}, tmp_path / "flux.safetensors")
    with pytest.raises(LoRAError, match="different model"):
        apply_lora(unet, tmp_path / "flux.safetensors")
    f = random_factors()
    name = f"{ATTN}.ff.net.2"
    f[name] = (torch.randn(4, 64), torch.randn(32, 4), 4.0)  # right name, wrong width: nothing may be applied
    write_peft(tmp_path / "bad.safetensors", f)
    with pytest.raises(LoRAError, match="different model"):
        apply_lora(unet, tmp_path / "bad.safetensors")
    assert loaded_loras(unet) == {} and torch.equal(run(unet), before)
    with pytest.raises(LoRAError, match="does not exist"):
        read_lora(tmp_path / "nope.safetensors", set())


MALFORMED_FACTORS = {  # a LoRA of one Linear(8 -> 6) layer: (down, up, alpha) -> the error
    "up not a matrix": ((torch.randn(2, 8), torch.randn(6), None), r"has up torch.float32 \(6,\)"),
    "rank 0": ((torch.randn(0, 8), torch.randn(6, 0), None), r"has down torch.float32 \(0, 8\)"),
    "integer factors": ((torch.ones(2, 8, dtype=torch.int32), torch.ones(6, 2, dtype=torch.int32), None), "has down torch.int32"),
    "up of a 3x3 conv": ((torch.randn(2, 8), torch.randn(6, 2, 3, 3), None), "do not fit a layer of Linear shape"),
    "alpha not one number": ((torch.randn(2, 8), torch.randn(6, 2), torch.tensor([1.0, 2.0])), r"has alpha of shape \(2,\)"),
    "NaN alpha": ((torch.randn(2, 8), torch.randn(6, 2), torch.tensor(float("nan"))), "non-finite values in its alpha"),
    "inf in up": ((torch.randn(2, 8), torch.full((6, 2), float("inf")), None), "non-finite values in its up"),
}


@pytest.mark.parametrize("case", MALFORMED_FACTORS)
def test_malformed_factors_rejected_by_name(tmp_path, case):
    (down, up, alpha), message = MALFORMED_FACTORS[case]
    state = {"proj.lora_A.weight": down, "proj.lora_B.weight": up} | ({} if alpha is None else {"proj.alpha": alpha})
    save_file(state, tmp_path / "bad.safetensors")
    model = torch.nn.Sequential()
    model.add_module("proj", torch.nn.Linear(8, 6))
    with pytest.raises(LoRAError, match=message):
        apply_lora(model, tmp_path / "bad.safetensors")
    assert loaded_loras(model) == {} and isinstance(model.proj, torch.nn.Linear)
