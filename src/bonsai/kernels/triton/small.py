"""Launcher for the few-row W1A16 kernel (gluon_small.py), ops.py's variant "mma" at M <= SMALL_M.

It takes what ops.w1a16 has prepared (x with column scales applied, the fragment words, the epilogue's
operands), on CUDA GPUs with mma.sync (compute capability 8.0 and up), for products it covers: no group
scales, no low-rank term, head norms whose heads fit the tile. supports() says whether a product is covered.
The K split is chosen per (M bucket, N, K, epilogue) by timing CANDIDATES on the first call, as ws.py
chooses its tiles (so the first call must not be captured in a CUDA graph).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton

from ..packed import PackedWeight

SMALL_M = 16  # the kernel's tokens per tile (two mma.sync of 8)
SIGN_PAIR = -2147450880  # 0x80008000 as int32: the sign bits of two 16-bit floats in one register


class SmallTile(NamedTuple):
    rows: int = 64  # weight rows per program, 32 or 64 (128 spills registers with Triton 3.6)
    split_k: int = 1  # K shares, each its own program; the last of a row tile adds them
    warps: int = 4  # each takes every warps-th K step of the share


def candidates(k: int) -> list[SmallTile]:
    """The tiles the first call of a shape times: K shares of at least one 64-column step per warp."""
    steps = triton.cdiv(k, 64)
    return [SmallTile(r, s, w) for r, w in ((64, 4), (64, 8), (32, 4)) for s in (1, 2, 4, 8, 16)
            if s == 1 or steps >= s * w]


def supports(x: torch.Tensor, weight: PackedWeight, head_dim: int, rank: int) -> bool:
    """Whether the kernel covers x [M, K] @ W.T with this epilogue (else: the fragment kernels)."""
    return (x.is_cuda and x.shape[0] <= SMALL_M and torch.cuda.get_device_capability(x.device) >= (8, 0)
            and weight.group_size == 0 and rank == 0 and x.is_contiguous() and 64 % max(head_dim, 1) == 0)


def w1a16(xc: torch.Tensor, words: torch.Tensor, out: torch.Tensor, epi: tuple, scalars: tuple, consts: dict,
          tile: SmallTile | None = None) -> None:
    """out = epilogue(xc @ W.T) for xc bf16/fp16 [M, K], M <= SMALL_M (column scales applied); epi:
    ops._epilogue_args, scalars: ops._epilogue_scalars, consts: ops' kernel constants."""
    from . import ws
    from .gluon_small import w1a16_small_kernel
    from .ops import _tile_counters

    rs, ro, xsum, _xv, _ut, bias, res, gate, nw = epi
    (m, k), n = xc.shape, out.shape[1]
    flags = {key: consts[key] for key in ws.FLAGS}
    base = consts["ONE_BITS"] * 0x10001

    def launch(t: SmallTile) -> None:
        row_tiles = triton.cdiv(n, t.rows)
        part, count = out, out
        if t.split_k > 1:
            part = torch.empty(t.split_k, m, n, dtype=torch.float32, device=xc.device)
            count = _tile_counters(xc.device, row_tiles)
        w1a16_small_kernel[(row_tiles, t.split_k)](
            xc, words, out, part, count, rs, ro, xsum, bias, res, gate, nw, m, n, k, words.shape[1], *scalars,
            SIGN_PAIR, base, **flags, R=t.rows, KCH=1, SPLIT_K=t.split_k, num_warps=t.warps)

    ws.timed_choice("small-w1a16", launch, candidates(k), m, n, k, flags, tile)
