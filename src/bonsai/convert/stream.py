"""Full-precision diffusers model -> 1-bit model, one layer at a time.

The model is built on the meta device from its config; then, module by module, its weights are
read from the source (one tensor at a time), binarized where the policy says, and assigned. At
no point does the whole full-precision model exist in memory: the peak is the packed model plus
one layer as stored and a block of its rows in float32 (benchmarks/bench_quantize_rss.py
measures it at full size).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import resource
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from tqdm import tqdm

from ..quant import BinarizeConfig, BitConv2d, BitLinear, QuantPolicy
from ..quant.binarize import binarize
from .adapters import Adapter
from .source import Source, SourceError


@dataclass(frozen=True)
class ConversionStats:
    parameters: int  # all stored values of the model (parameters and persistent buffers)
    parameters_1bit: int  # weights now stored at ~1 bit
    layers_1bit: int
    source_bytes: int  # bytes of the weight files read
    fp16_bytes: int  # the same model in fp16
    peak_rss_bytes: int  # of this process so far


def policy_for(adapter: Adapter, policy: QuantPolicy) -> QuantPolicy:
    """`policy` with the adapter's keep patterns (and the user's extra ones) in place of the generic defaults."""
    return QuantPolicy(policy.binarize, adapter.keep + tuple(p for p in policy.keep if p not in adapter.keep), policy.min_params, policy.convs)


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None elsewhere."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def release_freed_memory() -> None:
    """Give freed heap pages back to the OS. glibc keeps the float32 layers this loop frees as
    fragmented heap: measured on the SD 1.5 UNet, without this the process held ~1.1 GiB more than
    the packed model needs by the end (benchmarks/bench_quantize_rss.py)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _binarize_module(module: nn.Module, config: BinarizeConfig) -> nn.Module:
    """The packed form of a loaded nn.Linear / nn.Conv2d (its weight in the stored dtype; binarize()
    takes row-separable schemes a block of rows at a time, so no float32 copy of the layer is made)."""
    linear = BitLinear.from_packed(binarize(module.weight.reshape(module.weight.shape[0], -1), config), module.bias, config)
    if isinstance(module, nn.Linear):
        return linear
    return BitConv2d(linear, module.in_channels, module.kernel_size, module.stride, module.padding, module.dilation)


def _get_like(source: Source, key: str, like: torch.Tensor) -> torch.Tensor:
    """Source tensor `key`, checked against the shape and kind (float or not) the config implies for it."""
    t = source.get(key)
    if tuple(t.shape) != tuple(like.shape):
        raise SourceError(f"{source.path}: tensor '{key}' has shape {tuple(t.shape)}, the config implies {tuple(like.shape)}")
    if t.is_floating_point() != like.is_floating_point():
        raise SourceError(f"{source.path}: tensor '{key}' has dtype {t.dtype}, the model holds {like.dtype} there")
    return t


def _load_direct(module: nn.Module, prefix: str, source: Source, dtype: torch.dtype | None) -> None:
    """Replace the module's own (not its children's) meta parameters and persistent buffers with
    source tensors, cast to `dtype` (None: as stored)."""
    for name, param in list(module._parameters.items()):
        if param is None:
            continue
        t = _get_like(source, prefix + name, param)
        module._parameters[name] = nn.Parameter(t.to(dtype) if dtype and t.is_floating_point() else t, requires_grad=False)
    for name, buf in list(module._buffers.items()):
        if buf is None or name in module._non_persistent_buffers_set or prefix + name not in source:
            continue
        module._buffers[name] = _get_like(source, prefix + name, buf).to(buf.dtype)


def quantize_source(
    source: Source, policy: QuantPolicy, dtype: torch.dtype = torch.bfloat16, progress: bool = True
) -> tuple[nn.Module, ConversionStats]:
    """Build source's model with its 1-bit layers packed; other tensors in `dtype`. Returns (model, stats)."""
    model = source.adapter.build(source.config)
    policy = policy_for(source.adapter, policy)
    targets = {name for name, m in model.named_modules() if name and policy.wants(name, m)}
    if not targets:  # before any weight is read: the output would hold no 1-bit layer
        raise ValueError(
            f"no layer to binarize: the keep patterns and the minimum of {policy.min_params} weights per layer "
            "leave every layer in high precision (drop a --keep pattern or lower --min-params)"
        )
    total = sum(t.numel() for t in model.state_dict().values())  # parameters and persistent buffers, as stored
    # names only: a list of the modules themselves would keep every replaced float layer alive
    names = [name for name, m in model.named_modules() if m._parameters or m._buffers]
    params_1bit = 0
    for name in tqdm(names, desc="quantizing", unit="layer", disable=not progress):
        module = model.get_submodule(name)
        prefix = f"{name}." if name else ""
        if name not in targets:
            _load_direct(module, prefix, source, dtype)
            continue
        _load_direct(module, prefix, source, None)
        params_1bit += module.weight.numel()
        packed = _binarize_module(module, policy.binarize)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, packed)
        del module  # its float32 weight goes now, not at the end
        release_freed_memory()
    leftover = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if leftover:
        raise SourceError(f"{source.path}: no weights for {len(leftover)} parameters, e.g. '{leftover[0]}'")
    stats = ConversionStats(total, params_1bit, len(targets), source.source_bytes(), 2 * total, peak_rss_bytes())
    return model.eval().requires_grad_(False), stats
