"""Models <-> checkpoint files: save a (partly) 1-bit model, and load one without ever building
full-precision weights for its 1-bit layers (the skeleton is made on the meta device)."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from ..format import CheckpointError, LayerSpec, load_checkpoint, read_header, save_checkpoint
from ..quant import BinarizeConfig, BitConv2d, BitLinear, bit_layers
from .registry import build_architecture


def layer_specs(model: nn.Module) -> dict[str, LayerSpec]:
    return {
        name: LayerSpec.of(layer.packed, layer.config.scheme, bias=layer.bias is not None)
        for name, layer in bit_layers(model).items()
    }


def _is_packed(name: str, layers: dict[str, Any]) -> bool:
    return name.rsplit(".", 1)[0] in layers


def model_tensors(model: nn.Module, high_precision_dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """The state dict as stored: packed tensors untouched, everything else in `high_precision_dtype`."""
    layers = bit_layers(model)
    out = {}
    for name, t in model.state_dict().items():
        keep = _is_packed(name, layers) and not name.endswith(".bias")
        out[name] = t if keep or not t.is_floating_point() else t.to(high_precision_dtype)
    return out


def save_model(
    model: nn.Module,
    path: str | os.PathLike[str],
    architecture: str,
    config: dict,
    high_precision_dtype: torch.dtype = torch.bfloat16,
    **metadata: Any,
) -> None:
    """Write `model` as a Bonsai checkpoint. `metadata` adds provenance, license, name, pipeline, ..."""
    meta = {
        "architecture": architecture,
        "config": config,
        "quantization": {
            "layers": {name: spec.to_json() for name, spec in layer_specs(model).items()},
            "high_precision_dtype": str(high_precision_dtype).removeprefix("torch."),
        },
        "provenance": {},
        "license": "unknown",
        **metadata,
    }
    save_checkpoint(path, model_tensors(model, high_precision_dtype), meta)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _matrix_of(module: nn.Module) -> tuple[int, int, bool] | None:
    """(in_features, out_features, has bias) of the weight matrix a 1-bit layer replaces, or None."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features, module.bias is not None
    if isinstance(module, nn.Conv2d) and module.groups == 1:
        kh, kw = module.kernel_size
        return module.in_channels * kh * kw, module.out_channels, module.bias is not None
    return None


def build_skeleton(architecture: str, config: dict, layers: dict[str, LayerSpec]) -> nn.Module:
    """The model on the meta device with empty 1-bit layers where `layers` says."""
    with torch.device("meta"):
        model = build_architecture(architecture, config)
    for name, spec in layers.items():
        parent_name, _, child = name.rpartition(".")
        try:
            parent = model.get_submodule(parent_name) if parent_name else model
            is_conv = child == "linear" and isinstance(parent, nn.Conv2d)  # a BitConv2d stores its matrix as .linear
            original = parent if is_conv else model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"packed layer '{name}' has no module in a {architecture} model", "<metadata>") from None
        # The spec sizes the 1-bit layer; one that disagrees with the architecture would load and fail (or drop a bias) later.
        have, want = _matrix_of(original), (spec.in_features, spec.out_features, spec.bias)
        if have != want:
            there = "no linear or conv layer" if have is None else f"in {have[0]}, out {have[1]}, bias {have[2]}"
            raise CheckpointError(
                f"packed layer '{name}' has in {want[0]}, out {want[1]}, bias {want[2]}, but the {architecture} "
                f"model has {there} there",
                "<metadata>",
                "the quantization metadata does not match the config: re-export the model",
            )
        cfg = BinarizeConfig(spec.scheme, spec.group_size, spec.rank)
        bit = BitLinear(spec.in_features, spec.out_features, spec.bias, cfg, device="meta")
        if is_conv:
            conv = parent
            _replace(model, parent_name, BitConv2d(bit, conv.in_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation))
        else:
            _replace(model, name, bit)
    return model


def cast_high_precision_(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast float parameters and buffers to `dtype`, leaving packed tensors (signs, scales) as they are."""
    packed = {id(t) for layer in bit_layers(model).values() for t in layer.packed.tensors().values()}
    for module in model.modules():
        for key, t in list(module._parameters.items()) + list(module._buffers.items()):
            if t is not None and t.is_floating_point() and id(t) not in packed and t.dtype != dtype:
                if key in module._parameters:
                    module._parameters[key] = nn.Parameter(t.to(dtype), requires_grad=False)
                else:
                    module._buffers[key] = t.to(dtype)
    return model


def load_model(path: str | os.PathLike[str], device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> tuple[nn.Module, dict]:
    """Load a checkpoint into its architecture; returns (model in eval mode, metadata)."""
    header = read_header(path)
    meta = header.metadata
    try:
        model = build_skeleton(meta["architecture"], meta["config"], header.layers)
    except CheckpointError as e:  # raised for the metadata: name the file instead
        raise CheckpointError(e.problem, header.path, e.fix) from None
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"config does not build a {meta['architecture']} model ({e})", header.path) from None
    state = model.state_dict(keep_vars=True)
    expected = {name: (t.dtype if _is_packed(name, header.layers) and not name.endswith(".bias") else None, tuple(t.shape)) for name, t in state.items()}
    ckpt = load_checkpoint(header.path, device=device, expected=expected)
    model.load_state_dict(ckpt.tensors, assign=True, strict=True)
    cast_high_precision_(model, dtype)
    return model.eval().requires_grad_(False), meta
