"""Launcher for the few-row W1A16 kernel (gluon_small.py), ops.py's variant "mma" at M <= SMALL_M.

It takes what ops.w1a16 has prepared (x with column scales applied, the fragment words, the epilogue's
operands), on Hopper (mma.sync, and TMA to bring each program's K share at once), for products it covers: no
group scales, no low-rank term, head norms whose heads fit the tile. supports() says whether a product is
covered. The tile is chosen per (M bucket, N, K, epilogue) by timing candidates() on the first call, as ws.py
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
    rows: int = 64  # weight rows per program: 16 per warp and more
    chunks: int = 8  # 64-column chunks per program (its K share, all in flight at once): a power of two
    warps: int = 4


def candidates(k: int) -> list[SmallTile]:
    """The tiles the first call of a shape times."""
    chunks = triton.cdiv(k, 64)
    return [SmallTile(r, c, w) for r, w in ((64, 4), (128, 4), (128, 8)) for c in (2, 4, 8, 16)
            if c <= max(2, triton.next_power_of_2(chunks))]


def supports(x: torch.Tensor, weight: PackedWeight, head_dim: int, rank: int) -> bool:
    """Whether the kernel covers x [M, K] @ W.T with this epilogue (else: the fragment kernels). TMA reads x:
    16-byte aligned rows. Head norms need whole heads in the narrowest tile (32 rows)."""
    return (x.is_cuda and x.shape[0] <= SMALL_M and torch.cuda.get_device_capability(x.device) >= (9, 0)
            and weight.group_size == 0 and rank == 0 and weight.in_features % 8 == 0 and x.is_contiguous()
            and x.data_ptr() % 16 == 0 and 32 % max(head_dim, 1) == 0)


def w1a16(xc: torch.Tensor, words: torch.Tensor, out: torch.Tensor, epi: tuple, scalars: tuple, consts: dict,
          tile: SmallTile | None = None) -> None:
    """out = epilogue(xc @ W.T) for xc bf16/fp16 [M, K], M <= SMALL_M (column scales applied); epi:
    ops._epilogue_args, scalars: ops._epilogue_scalars, consts: ops' kernel constants."""
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    from . import ws
    from .gluon_small import w1a16_small_kernel
    from .ops import _tile_counters

    rs, ro, xsum, _xv, _ut, bias, res, gate, nw = epi
    (m, k), n = xc.shape, out.shape[1]
    flags = {key: consts[key] for key in ws.FLAGS}
    base = consts["ONE_BITS"] * 0x10001
    dtype = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16}[xc.dtype]
    x_desc = TensorDescriptor.from_tensor(xc, [SMALL_M, 64], gl.NVMMASharedLayout.get_default_for([SMALL_M, 64], dtype))
    word_layout = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=3)

    def launch(t: SmallTile) -> None:
        row_tiles, shares = triton.cdiv(n, t.rows), triton.cdiv(words.shape[1], t.chunks)
        part, count = out, out
        if shares > 1:
            part = torch.empty(shares, m, n, dtype=torch.float32, device=xc.device)
            count = _tile_counters(xc.device, row_tiles)
        w_desc = TensorDescriptor.from_tensor(words, [t.rows // 16, 1, 32], word_layout)
        w1a16_small_kernel[(row_tiles, shares)](
            x_desc, w_desc, out, part, count, rs, ro, xsum, bias, res, gate, nw, m, n, k, *scalars, SIGN_PAIR, base,
            **flags, CH=t.chunks, SPLIT_K=shares, num_warps=t.warps)

    ws.timed_choice("small-w1a16", launch, candidates(k), m, n, k, flags, tile)
