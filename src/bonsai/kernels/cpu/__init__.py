"""Compiled CPU kernel for bitmatmul: int8 activations x 1-bit weights (see bitmm.cpp for the method).

Importing this module registers the kernel with the dispatcher for CPU tensors. When the library
was not built, importing warns once and raises ImportError; bitmatmul then uses the reference path.
Environment: BONSAI_CPU_ISA=auto|scalar|avx2|avx512|amx|neon forces a code path, BONSAI_CPU_THREADS
sets the thread count (default torch.get_num_threads()).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..dispatch import Kernel, register_kernel
from ..packed import PackedWeight
from . import binding

try:
    _lib = binding.load_library(binding.library_path())
except ImportError as err:
    binding.warn_reference_path(str(err))
    raise

_INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class CpuWeight:
    """The tensors the kernel reads, contiguous, and their C view. No repacking of the signs (the
    kernel expands the stored bit layout on the fly, so CPU weight memory stays at 1 bit); only the
    small low-rank factors are kept in float32 (V [r, K] and U.T [r, N]) for the fused epilogue."""

    tensors: tuple[torch.Tensor | None, ...]
    c_weight: binding.Weight


def _prepare(weight: PackedWeight) -> CpuWeight:
    def contiguous(t: torch.Tensor | None, dtype: torch.dtype | None = None) -> torch.Tensor | None:
        return None if t is None else t.to(dtype or t.dtype).contiguous()

    v = contiguous(weight.lowrank_v, torch.float32)
    ut = None if weight.lowrank_u is None else contiguous(weight.lowrank_u.T, torch.float32)
    tensors = (
        contiguous(weight.signs), contiguous(weight.row_scale), contiguous(weight.group_scale),
        contiguous(weight.col_scale), contiguous(weight.row_offset), v, ut,
    )  # fmt: skip
    signs, row_scale, group_scale, col_scale, row_offset = tensors[:5]
    c_weight = binding.make_weight(
        signs, weight.in_features, row_scale, weight.group_size, group_scale, col_scale, row_offset, v, ut
    )
    return CpuWeight(tensors, c_weight)


def available_isas() -> list[str]:
    """ISA paths of the compiled kernel this CPU can run (scalar always)."""
    return binding.available_isas(_lib)


def chosen_isa() -> str:
    """The path bitmatmul uses now (BONSAI_CPU_ISA or the fastest available)."""
    return binding.chosen_isa(_lib)


def bitmatmul_cpu(x: torch.Tensor, weight: PackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W.T + bias for x [..., K] (float32, or bf16/fp16 converted to float32) and bias [N] or
    None; returns [..., N] in x.dtype.

    Activations are quantized to int8 per row (absmax), so the result matches the reference to
    about 1e-2 relative error; the low-rank term and the bias are added in float32 in the kernel."""
    k, n = weight.in_features, weight.out_features
    x2 = x.reshape(-1, k).to(torch.float32).contiguous()
    w = weight.prepared("cpu", _prepare)
    b = None if bias is None else bias.to(torch.float32).contiguous()
    y = binding.call_bitmm(_lib, binding.chosen_isa(_lib), binding.thread_count(), x2, w.c_weight, b)
    return y.reshape(*x.shape[:-1], n).to(x.dtype)


def _supports(x: torch.Tensor, weight: PackedWeight) -> bool:
    return x.device.type == "cpu" and weight.device.type == "cpu" and x.dtype in _INPUT_DTYPES


register_kernel(Kernel("cpu", ("cpu",), bitmatmul_cpu, _supports, fuses_bias=True))
