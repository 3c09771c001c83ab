"""Random weights for a model skeleton, filled tensor by tensor (nothing is built twice).

A skeleton is a model on the meta device (see io.build_skeleton): every tensor has a shape and a
dtype but no storage. `fill_random_` gives each meta tensor storage on `device` and random
values of plausible magnitude, one tensor at a time, so peak memory is the model's own size
(packed 1-bit layers stay packed: a full-precision copy of a 1-bit layer never exists).

Random weights are for measuring size, memory and speed; they generate noise, not images.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..quant import bit_layers


def _normal(shape: tuple[int, ...], std: float, mean: float, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.randn(shape, generator=gen, device=device) * std + mean


def random_packed(name: str, shape: tuple[int, ...], dtype: torch.dtype, in_features: int, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    """One tensor of a packed [N, K] weight (field `name` of PackedWeight) with the statistics a
    binarized fan-in-scaled Gaussian weight would have: E|W| = sqrt(2/pi) / sqrt(K)."""
    if name == "signs":
        return torch.randint(0, 256, shape, generator=gen, device=device, dtype=torch.uint8)
    if name == "row_scale":
        out = _normal(shape, 0.1, 1.0, gen, device).abs() * math.sqrt(2 / math.pi) / math.sqrt(in_features)
    elif name in ("group_scale", "col_scale"):
        out = _normal(shape, 0.1, 1.0, gen, device).abs()
    elif name == "row_offset":
        out = _normal(shape, 0.01 / math.sqrt(in_features), 0.0, gen, device)
    elif name == "lowrank_u":
        out = _normal(shape, 0.1 / math.sqrt(in_features), 0.0, gen, device)
    elif name == "lowrank_v":
        out = _normal(shape, 1.0 / math.sqrt(shape[0]), 0.0, gen, device)
    else:
        raise ValueError(f"unknown packed tensor field {name!r}")
    return out.to(dtype)


def random_high_precision(key: str, shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    """A float parameter: matrices and kernels ~ N(0, 1/fan_in); norm scales ~ 1; biases ~ 0."""
    if len(shape) >= 2:
        out = _normal(shape, 1.0 / math.sqrt(math.prod(shape[1:])), 0.0, gen, device)
    elif key == "weight":
        out = _normal(shape, 0.02, 1.0, gen, device)
    else:
        out = _normal(shape, 0.02, 0.0, gen, device)
    return out.to(dtype)


@torch.no_grad()
def fill_random_(model: nn.Module, device: str | torch.device, dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> nn.Module:
    """Give every meta tensor of `model` random values on `device` (packed fields keep their
    dtypes, other floats get `dtype`); tensors that already have storage are left alone."""
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    for layer in bit_layers(model).values():
        for name in layer.packed.tensors():
            meta = getattr(layer, name)
            if meta.is_meta:
                setattr(layer, name, random_packed(name, tuple(meta.shape), meta.dtype, layer.in_features, gen, device))
    for module in model.modules():
        for key, t in list(module._parameters.items()):
            if t is not None and t.is_meta:
                module._parameters[key] = nn.Parameter(random_high_precision(key, tuple(t.shape), dtype, gen, device), requires_grad=False)
        for key, t in list(module._buffers.items()):
            if t is not None and t.is_meta:
                if not t.is_floating_point():
                    raise ValueError(f"buffer '{key}' of {type(module).__name__} is a {t.dtype} constant; build it with real values")
                module._buffers[key] = random_high_precision(key, tuple(t.shape), dtype, gen, device)
    return model
