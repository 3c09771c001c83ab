"""Compiled CPU kernel for bitmatmul: int8 activations x 1-bit weights (see bitmm.cpp for the method).

Importing this module registers the kernel with the dispatcher for CPU tensors. When the library
was not built, importing warns once and raises ImportError; bitmatmul then uses the reference path.
Environment: BONSAI_CPU_ISA=auto|scalar|avx2|avxvnni|avx512|amx|neon forces a code path, BONSAI_CPU_THREADS
sets the thread count (default torch.get_num_threads()).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..dispatch import Kernel, register_kernel
from ..fusion import PARTS, Epilogue, Prologue, rows_per_sample
from ..packed import PackedWeight
from . import binding

try:
    _lib = binding.load_library(binding.library_path())
except ImportError as err:
    binding.warn_reference_path(str(err))
    raise

_INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_NO_PROLOGUE, _NO_EPILOGUE = Prologue(0.0), Epilogue()


@dataclass(frozen=True)
class CpuWeight:
    """The tensors the kernel reads, contiguous, and their C view. No repacking of the signs (the
    kernel expands the stored bit layout on the fly, so CPU weight memory stays at 1 bit); of the
    low-rank factors, V is kept in float32 (x V.T runs in float32 FMAs) and U in bfloat16 tiles (the
    same size as U), which every path reads, and V once more in bfloat16 tiles where the AMX path can run."""

    tensors: tuple[torch.Tensor | None, ...]
    c_weight: binding.Weight


def _lowrank_tiles(u: torch.Tensor) -> torch.Tensor:
    """U [N, r] in the AMX-BF16 B-tile layout of bitmm.h (Problem::lowrank_ub): [ceil(N / 32) * 2,
    r rounded up to 16 / 2, 16, 2] bfloat16 (per 16 output columns, pairs of ranks interleaved), then
    8 zero rows of [16, 2] that a tile load of the last half-used block reads."""
    n, r = u.shape
    blocks, rank_pad = -(-n // 32) * 2, -(-r // 16) * 16
    padded = torch.zeros(blocks * 16, rank_pad, dtype=torch.bfloat16)
    padded[:n, :r] = u
    tiles = padded.view(blocks, 16, rank_pad // 2, 2).transpose(1, 2).reshape(-1, 16, 2)
    return torch.cat([tiles, tiles.new_zeros(8, 16, 2)])


def _lowrank_v_tiles(v: torch.Tensor) -> torch.Tensor:
    """V [r, K] in the AMX-BF16 B-tile layout of bitmm.h (Problem::lowrank_vb): [r rounded up to 16 / 16,
    ceil(K / 32), 16, 16, 2] bfloat16 (per 16 ranks and 32 columns: pairs of columns by rank)."""
    r, k = v.shape
    blocks, kt = -(-r // 16), -(-k // 32)
    padded = torch.zeros(blocks * 16, kt * 32, dtype=torch.bfloat16)
    padded[:r, :k] = v
    return padded.view(blocks, 16, kt, 16, 2).permute(0, 2, 3, 1, 4).contiguous()


def _prepare(weight: PackedWeight) -> CpuWeight:
    def contiguous(t: torch.Tensor | None, dtype: torch.dtype | None = None) -> torch.Tensor | None:
        return None if t is None else t.to(dtype or t.dtype).contiguous()

    v = ub = vb = None
    if weight.rank:
        v = contiguous(weight.lowrank_v, torch.float32)
        ub = _lowrank_tiles(weight.lowrank_u)
        if "amx" in available_isas():  # only the AMX path reads V in tiles (it falls back without them)
            vb = _lowrank_v_tiles(weight.lowrank_v)
    tensors = (
        contiguous(weight.signs), contiguous(weight.row_scale), contiguous(weight.group_scale),
        contiguous(weight.col_scale), contiguous(weight.row_offset), v, ub, vb,
    )  # fmt: skip
    signs, row_scale, group_scale, col_scale, row_offset = tensors[:5]
    c_weight = binding.make_weight(
        signs, weight.in_features, row_scale, weight.group_size, group_scale, col_scale, row_offset, v, ub, vb
    )
    return CpuWeight(tensors, c_weight)


def available_isas() -> list[str]:
    """ISA paths of the compiled kernel this CPU can run (scalar always)."""
    return binding.available_isas(_lib)


def chosen_isa() -> str:
    """The path bitmatmul uses now (BONSAI_CPU_ISA or the fastest available)."""
    return binding.chosen_isa(_lib)


def _f32(t: torch.Tensor | None) -> torch.Tensor | None:
    """t as a contiguous float32 tensor (itself when it already is one: this runs per call)."""
    if t is None or (t.dtype == torch.float32 and t.is_contiguous()):
        return t
    return t.to(torch.float32).contiguous()


def _fusion(
    x: torch.Tensor, n: int, prologue: Prologue | None, epilogue: Epilogue | None
) -> tuple[binding.Fusion | None, tuple[torch.Tensor | None, ...]]:
    """The C view of the row operations for x [..., K] -> [..., N], and the float32 tensors it points
    to (which the caller keeps alive during the call)."""
    if prologue is None and epilogue is None:
        return None, ()
    pro, epi = prologue or _NO_PROLOGUE, epilogue or _NO_EPILOGUE
    rows = rows_per_sample(x, prologue, epilogue)
    residual = None if epi.residual is None else _f32(epi.residual.reshape(-1, n))
    keep = (_f32(pro.weight), _f32(pro.bias), _f32(pro.shift), _f32(pro.scale), _f32(epi.norm_weight), residual, _f32(epi.gate))
    ln_weight, ln_bias, shift, scale, norm_weight, residual, gate = (binding.pointer(t) for t in keep)
    groups, norm_dim = (0, 0) if epi.norm_weight is None else epi.norm_weight.shape
    fusion = binding.Fusion(
        rows, prologue is not None, pro.eps, ln_weight, ln_bias, shift, scale,
        epi.gelu, epi.norm_cols, norm_dim, groups, epi.norm_eps, norm_weight, residual, gate,
    )  # fmt: skip
    return fusion, keep


def bitmatmul_cpu(
    x: torch.Tensor,
    weight: PackedWeight,
    bias: torch.Tensor | None = None,
    prologue: Prologue | None = None,
    epilogue: Epilogue | None = None,
) -> torch.Tensor:
    """y = epilogue(prologue(x) @ W.T + bias) for x [..., K] (float32, or bf16/fp16 converted to
    float32), bias [N] or None and the optional row operations of bonsai.kernels.fusion; returns
    [..., N] in x.dtype.

    Activations are quantized to int8 per row (absmax, after the prologue), so the result matches
    the reference to about 1e-2 relative error; the low-rank term, the bias and the epilogue are
    computed in float32 in the kernel."""
    k, n = weight.in_features, weight.out_features
    x2 = _f32(x.reshape(-1, k))
    w = weight.prepared("cpu", _prepare)
    fusion, _alive = _fusion(x, n, prologue, epilogue)
    y = binding.call_bitmm(_lib, binding.chosen_isa(_lib), binding.thread_count(), x2, w.c_weight, _f32(bias), fusion)
    y = y.view(*x.shape[:-1], n)
    return y if x.dtype == torch.float32 else y.to(x.dtype)


def _has_vector_path() -> bool:
    """Whether a vector path runs here (or the portable one was asked for by name). The portable C
    loops are ~25x slower than the reference path's torch matmul (bonsai-emoji: 47 s against 1.9 s an
    image), so without a vector path the dispatcher takes the reference path."""
    if binding.chosen_isa(_lib) != "scalar" or os.environ.get("BONSAI_CPU_ISA", "").strip().lower() == "scalar":
        return True
    binding.warn_reference_path("this CPU runs none of the compiled kernel's vector paths (AVX2, AVX-512, AMX, NEON)",
                                fix="BONSAI_CPU_ISA=scalar runs the kernel's portable path anyway.")
    return False


def _supports(x: torch.Tensor, weight: PackedWeight) -> bool:
    return x.device.type == "cpu" and weight.device.type == "cpu" and x.dtype in _INPUT_DTYPES and _has_vector_path()


register_kernel(Kernel("cpu", ("cpu",), bitmatmul_cpu, _supports, fuses_bias=True, fuses=PARTS))
