"""The weight layouts the Triton kernels read, built once per PackedWeight (and only when used).

- `layout_of`: scales and low-rank factors in the form both kernel families read.
- `kmajor_signs`: the signs K-major for the "k-major" kernels (kernels.py): uint8 [ceil(K/8), N],
  the transpose of PackedWeight.signs. Every byte keeps the packing.py bit order (bit j of byte b =
  column 8b + j), so a [BLOCK_K/8, BLOCK_N] tile is one coalesced load that expands to
  [BLOCK_K, BLOCK_N] signs in registers. The "fragment" kernels read fragments.py's words instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..packed import PackedWeight

LAYOUT_KEY = "triton"
KMAJOR_KEY = "triton-k-major"
MIN_DOT = 16  # smallest inner dimension tl.dot accepts


@dataclass(frozen=True)
class TritonLayout:
    group_scale_t: torch.Tensor | None  # float32 [ceil(K/G), N] (W1A8 epilogue)
    group_bits_bf16: torch.Tensor | None  # int16 [ceil(K/G), N]: bf16 bit patterns (W1A16 folds them into B)
    group_bits_f16: torch.Tensor | None  # int16 [ceil(K/G), N]: fp16 bit patterns
    lowrank_v: torch.Tensor | None  # bfloat16 [R, K], rank zero-padded to R = max(16, 2^ceil(log2 r))
    lowrank_u_t: torch.Tensor | None  # bfloat16 [R, N]


def _padded_rank(r: int) -> int:
    return max(MIN_DOT, 1 << (r - 1).bit_length())


def build_layout(weight: PackedWeight) -> TritonLayout:
    """Repack `weight` for the Triton kernels (called through weight.prepared)."""
    gs_t = bits_bf16 = bits_f16 = None
    if weight.group_scale is not None:
        gs = weight.group_scale.t().contiguous()
        gs_t = gs.float()
        bits_bf16 = gs.to(torch.bfloat16).view(torch.int16)
        bits_f16 = gs.view(torch.int16)
    v = u_t = None
    if weight.lowrank_u is not None:
        r = weight.rank
        rp = _padded_rank(r)
        v = weight.lowrank_v.new_zeros(rp, weight.in_features)
        v[:r] = weight.lowrank_v
        u_t = weight.lowrank_u.new_zeros(rp, weight.out_features)
        u_t[:r] = weight.lowrank_u.t()
    return TritonLayout(gs_t, bits_bf16, bits_f16, v, u_t)


def layout_of(weight: PackedWeight) -> TritonLayout:
    return weight.prepared(LAYOUT_KEY, build_layout)


def kmajor_signs(weight: PackedWeight) -> torch.Tensor:
    return weight.prepared(KMAJOR_KEY, lambda w: w.signs.t().contiguous())
