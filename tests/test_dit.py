"""The DiT: shapes, text masking, and exact checkpoint round trips with malformed files rejected by name."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from bonsai.format import CheckpointError
from bonsai.models import DiT, DiTConfig, load_model, save_model
from bonsai.quant import DEFAULT_KEEP, BitConv2d, BitLinear, QuantPolicy, bit_layers, quantize_

PACKED_FIELDS = {"signs", "row_scale", "group_scale", "col_scale", "row_offset", "lowrank_u", "lowrank_v", "bias"}
FC1 = "blocks.0.mlp.fc1"


@pytest.mark.parametrize("height, width", [(16, 16), (8, 24), (32, 16), (4, 4)])
def test_forward_shapes_at_several_sizes(make_dit, make_inputs, height: int, width: int) -> None:
    model = make_dit()
    x, t, text, mask = make_inputs(height=height, width=width)
    with torch.no_grad():
        v = model(x, t, text, mask)
    assert v.shape == x.shape and v.dtype == torch.float32
    assert torch.isfinite(v).all() and v.abs().max() > 0


def test_latent_channels_and_patch_two(make_dit, make_inputs) -> None:
    config = DiTConfig(in_channels=4, patch_size=2, hidden_size=32, depth=2, num_heads=2, sample_size=8)
    model = make_dit(config)
    quantize_(model)
    x, t, text, mask = make_inputs(config, batch=3, height=6, width=10, tokens=4)
    with torch.no_grad():
        assert model(x, t, text, mask).shape == (3, 4, 6, 10)


def test_padded_text_tokens_are_ignored(make_dit, make_inputs) -> None:
    model = make_dit()
    x, t, text, mask = make_inputs()  # row 0: its last two tokens are padding
    with torch.no_grad():
        v = model(x, t, text, mask)
        changed = text.clone()
        changed[0, -2:] = 100 * torch.randn(2, text.shape[-1])
        torch.testing.assert_close(model(x, t, changed, mask), v, rtol=0, atol=1e-6)
        changed[0, 0] += 1.0  # a real token of row 0: row 0 changes, row 1 does not
        v2 = model(x, t, changed, mask)
    assert (v2[0] - v[0]).abs().max() > 1e-3
    torch.testing.assert_close(v2[1], v[1], rtol=0, atol=1e-6)


@pytest.mark.parametrize("height, width", [(18, 16), (16, 6)])
def test_size_not_divisible_by_patch(make_dit, make_inputs, height: int, width: int) -> None:
    x, t, text, mask = make_inputs(height=height, width=width)
    with pytest.raises(ValueError, match=f"{height}x{width} is not divisible by the patch size 4"):
        make_dit()(x, t, text, mask)


def test_config_rejects_bad_head_split() -> None:
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        DiTConfig(hidden_size=30, num_heads=4)


def _quantized(make_dit: Callable[..., DiT], policy: QuantPolicy = QuantPolicy()) -> DiT:
    model = make_dit()
    quantize_(model, policy)
    return model.requires_grad_(False)


def _save(model: DiT, path: Path, **kwargs) -> Path:
    save_model(model, path, "dit", model.config.to_dict(), name="tiny", pipeline={"text_encoder": "minilm"}, **kwargs)
    return path


def test_round_trip_is_exact(make_dit, make_inputs, tmp_path: Path) -> None:
    model = _quantized(make_dit)
    path = _save(model, tmp_path / "m.safetensors", high_precision_dtype=torch.float32)
    loaded, meta = load_model(path)
    assert meta["name"] == "tiny" and meta["pipeline"] == {"text_encoder": "minilm"}
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    original, restored = model.state_dict(), loaded.state_dict()
    assert original.keys() == restored.keys()
    for name, t in original.items():
        assert restored[name].dtype == t.dtype and torch.equal(restored[name], t), name
    x, t, text, mask = make_inputs()
    with torch.no_grad():
        assert torch.equal(loaded(x, t, text, mask), model(x, t, text, mask))


def test_round_trip_in_bfloat16_rounds_only_the_high_precision_tensors(make_dit, make_inputs, tmp_path: Path) -> None:
    model = _quantized(make_dit)
    loaded, _ = load_model(_save(model, tmp_path / "m.safetensors"))  # bf16 is the default storage
    packed = {f"{layer}.{field}" for layer in bit_layers(model) for field in PACKED_FIELDS - {"bias"}}
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point() and name not in packed:
                t.copy_(t.bfloat16().float())
        x, t, text, mask = make_inputs()
        assert torch.equal(loaded(x, t, text, mask), model(x, t, text, mask))


def test_loaded_one_bit_layers_hold_no_float_weight(make_dit, tmp_path: Path) -> None:
    model = _quantized(make_dit)
    loaded, _ = load_model(_save(model, tmp_path / "m.safetensors"))
    layers = bit_layers(loaded)
    assert set(layers) == set(bit_layers(model)) and len(layers) == 7
    for name, layer in layers.items():
        assert type(layer) is BitLinear
        assert layer.signs.dtype == torch.uint8
        assert layer.signs.shape == (layer.out_features, (layer.in_features + 7) // 8)
    # every tensor stored under a 1-bit layer is a packed field: no `.weight` anywhere below it
    for name in loaded.state_dict():
        parent, _, field = name.rpartition(".")
        if parent in layers:
            assert field in PACKED_FIELDS, name
    with safe_open(str(tmp_path / "m.safetensors"), framework="pt") as f:
        assert not any(key.rpartition(".")[0] in layers and key.endswith(".weight") for key in f.keys())


def test_round_trip_of_a_binarized_convolution(make_dit, make_inputs, tmp_path: Path) -> None:
    # drop "*embed*" from the keep list so the patch embedding (a Conv2d) becomes 1-bit too
    policy = QuantPolicy(keep=tuple(p for p in DEFAULT_KEEP if p != "*embed*"))
    model = _quantized(make_dit, policy)
    assert isinstance(model.patch_embed, BitConv2d)
    loaded, _ = load_model(_save(model, tmp_path / "m.safetensors", high_precision_dtype=torch.float32))
    assert isinstance(loaded.patch_embed, BitConv2d) and loaded.patch_embed.linear.signs.dtype == torch.uint8
    x, t, text, mask = make_inputs()
    with torch.no_grad():
        assert torch.equal(loaded(x, t, text, mask), model(x, t, text, mask))


def _rewrite(src: Path, dst: Path, tensors=lambda t: t, meta=lambda m: m) -> Path:
    """Copy a checkpoint with its tensors and/or metadata document edited, bypassing save_model's checks."""
    with safe_open(str(src), framework="pt") as f:
        document = json.loads(f.metadata()["bonsai"])
    save_file(tensors(load_file(str(src))), str(dst), metadata={"bonsai": json.dumps(meta(document))})
    return dst


def _edit(d: dict, **changes) -> dict:
    d.update(changes)
    return d


def _rename_layer(old: str, new: str):
    def tensors(ts: dict) -> dict:
        return {k.replace(old + ".", new + ".") if k.startswith(old + ".") else k: v for k, v in ts.items()}

    def meta(m: dict) -> dict:
        layers = m["quantization"]["layers"]
        layers[new] = layers.pop(old)
        return m

    return tensors, meta


def _swap_layers(a: str, b: str):
    """Exchange two packed layers' tensors and specs: each stays a consistent layer of the wrong size."""
    to_b, to_a = _rename_layer(a, "swap"), _rename_layer(b, a)
    last = _rename_layer("swap", b)
    return (lambda ts: last[0](to_a[0](to_b[0](ts))), lambda m: last[1](to_a[1](to_b[1](m))))


def _drop_bias(layer: str):
    def tensors(ts: dict) -> dict:
        return {k: v for k, v in ts.items() if k != f"{layer}.bias"}

    def meta(m: dict) -> dict:
        m["quantization"]["layers"][layer]["bias"] = False
        return m

    return tensors, meta


_RENAMED = _rename_layer("blocks.0.mlp.fc2", "blocks.0.mlp.fc9")
_NO_PARENT = _rename_layer("blocks.0.mlp.fc2", "blocks.7.mlp.fc2")
_SWAPPED = _swap_layers(FC1, "blocks.0.mlp.fc2")
_NO_BIAS = _drop_bias(FC1)
MALFORMED = {
    # packed tensors: wrong shape, wrong dtype, non-finite scale
    "packed-shape": (dict(tensors=lambda ts: _edit(ts, **{f"{FC1}.signs": torch.zeros(128, 5, dtype=torch.uint8)})),
                     f"tensor '{FC1}.signs' has shape (128, 5), expected (128, 4)"),
    "packed-dtype": (dict(tensors=lambda ts: _edit(ts, **{f"{FC1}.row_scale": ts[f"{FC1}.row_scale"].half()})),
                     f"tensor '{FC1}.row_scale' has dtype torch.float16, expected torch.float32"),
    "nan-scale": (dict(tensors=lambda ts: _edit(ts, **{f"{FC1}.row_scale": ts[f"{FC1}.row_scale"] * float("nan")})),
                  f"non-finite values in tensor '{FC1}.row_scale'"),
    # high-precision tensors checked against the architecture
    "hp-shape": (dict(tensors=lambda ts: _edit(ts, **{"final_proj.weight": torch.zeros(48, 31, dtype=torch.bfloat16)})),
                 "tensor 'final_proj.weight' has shape (48, 31), expected (48, 32)"),
    "missing": (dict(tensors=lambda ts: {k: v for k, v in ts.items() if k != "final_proj.bias"}),
                "missing tensor 'final_proj.bias'"),
    "extra": (dict(tensors=lambda ts: _edit(ts, stray=torch.zeros(3))), "unexpected tensor 'stray'"),
    # metadata that does not describe this model
    "unknown-architecture": (dict(meta=lambda m: _edit(m, architecture="unet9000")), "unknown architecture 'unet9000'"),
    "unknown-config-field": (dict(meta=lambda m: _edit(m, config={**m["config"], "n_experts": 4})),
                             "unknown DiT config fields: n_experts"),
    "bad-config-value": (dict(meta=lambda m: _edit(m, config={**m["config"], "num_heads": 3})),
                         "hidden_size 32 is not divisible by num_heads 3"),
    "zero-heads": (dict(meta=lambda m: _edit(m, config={**m["config"], "num_heads": 0})),
                   "DiT config field num_heads must be an integer >= 1, got 0"),
    "config-value-of-wrong-type": (dict(meta=lambda m: _edit(m, config={**m["config"], "hidden_size": "32"})),
                                   "DiT config field hidden_size must be an integer >= 1, got '32'"),
    "layer-not-in-model": (dict(tensors=_RENAMED[0], meta=_RENAMED[1]),
                           "packed layer 'blocks.0.mlp.fc9' has no module"),
    "layer-parent-not-in-model": (dict(tensors=_NO_PARENT[0], meta=_NO_PARENT[1]),
                                  "packed layer 'blocks.7.mlp.fc2' has no module"),
    "layer-size-not-the-model's": (dict(tensors=_SWAPPED[0], meta=_SWAPPED[1]),
                                   f"packed layer '{FC1}' has in 128, out 32, bias True, but the dit model has "
                                   "in 32, out 128, bias True there"),
    "layer-bias-dropped": (dict(tensors=_NO_BIAS[0], meta=_NO_BIAS[1]),
                           f"packed layer '{FC1}' has in 32, out 128, bias False, but the dit model has "
                           "in 32, out 128, bias True there"),
}  # fmt: skip


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_checkpoint_rejected_by_name(make_dit, tmp_path: Path, case: str) -> None:
    edits, message = MALFORMED[case]
    good = _save(_quantized(make_dit), tmp_path / "good.safetensors")
    bad = _rewrite(good, tmp_path / "bad.safetensors", **edits)
    with pytest.raises(CheckpointError, match=re.escape(message)) as info:
        load_model(bad)
    text = str(info.value)
    assert text.startswith(f"{bad}: ") and "\n" not in text and "<metadata>" not in text
