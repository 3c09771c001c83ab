"""Compiled CPU kernel for bitmatmul: int8 activations x 1-bit weights (see bitmm.cpp for the method).

Importing this module registers the kernel with the dispatcher for CPU tensors. When the library
was not built, importing warns once and raises ImportError; bitmatmul then uses the reference path.
Environment: BONSAI_CPU_ISA=auto|scalar|avx2|avx512|neon forces a code path, BONSAI_CPU_THREADS
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
    """The weight tensors the kernel reads, contiguous (no copy when they already are; no repacking:
    the kernel expands the stored bit layout on the fly, so CPU weight memory stays at 1 bit)."""

    signs: torch.Tensor
    row_scale: torch.Tensor
    group_scale: torch.Tensor | None
    col_scale: torch.Tensor | None
    row_offset: torch.Tensor | None


def _prepare(weight: PackedWeight) -> CpuWeight:
    def contiguous(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.contiguous()

    return CpuWeight(
        contiguous(weight.signs),
        contiguous(weight.row_scale),
        contiguous(weight.group_scale),
        contiguous(weight.col_scale),
        contiguous(weight.row_offset),
    )


def available_isas() -> list[str]:
    """ISA paths of the compiled kernel this CPU can run (scalar always)."""
    return binding.available_isas(_lib)


def chosen_isa() -> str:
    """The path bitmatmul uses now (BONSAI_CPU_ISA or the fastest available)."""
    return binding.chosen_isa(_lib)


def bitmatmul_cpu(x: torch.Tensor, weight: PackedWeight) -> torch.Tensor:
    """y = x @ W.T for x [..., K] (float32, or bf16/fp16 converted to float32); returns [..., N] in x.dtype.

    Activations are quantized to int8 per row (absmax), so the result matches the reference to
    about 1e-2 relative error; the low-rank term is computed in float32."""
    k, n = weight.in_features, weight.out_features
    x2 = x.reshape(-1, k).to(torch.float32).contiguous()
    w = weight.prepared("cpu", _prepare)
    y = binding.call_bitmm(
        _lib, binding.chosen_isa(_lib), binding.thread_count(), x2,
        w.signs, w.row_scale, weight.group_size, w.group_scale, w.col_scale, w.row_offset,
    )  # fmt: skip
    if weight.lowrank_u is not None:
        y.addmm_(x2 @ weight.lowrank_v.float().T, weight.lowrank_u.float().T)
    return y.reshape(*x.shape[:-1], n).to(x.dtype)


def _supports(x: torch.Tensor, weight: PackedWeight) -> bool:
    return x.device.type == "cpu" and weight.device.type == "cpu" and x.dtype in _INPUT_DTYPES


register_kernel(Kernel("cpu", ("cpu",), bitmatmul_cpu, _supports))
