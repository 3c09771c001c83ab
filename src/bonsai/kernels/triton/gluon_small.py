"""W1A16 for few rows (M <= 16) in Gluon, with mma.sync: the weights go from their words straight into the
tensor cores' A-operand registers, and nothing waits on an asynchronous wgmma.

The fragment kernel at M <= 16 expands the same words into wgmma's register operand; ptxas then waits for each
wgmma before the next step's expansion may write its registers (17 waits for 16 wgmmas a step; 375 instructions
per thread and 128 weight bits, benchmarks/RESULTS.md). mma.sync (Ampere's m16n8k16, which Hopper runs too)
takes its A operand from registers with the same lane layout as wgmma's (fragments.py), and is an ordinary
instruction: the scheduler overlaps it with the expansion of the next rows.

A program computes out^T[R, M] for R weight rows and one K share (SPLIT_K shares). Its warps do not split the
rows: each warp takes its own part of the share (a batched mma.sync, the batch being the warp), so that a warp
reads each activation once for all R rows (the activations, 16 tokens x 16 bits a column, outweigh the R bits
of weight a column), and the warps' sums are added through shared memory at the end. Each warp loads the words
and activations of its next K step before it expands and multiplies the present one.

Per pair of weights the expansion is one shift and one LOP3: ((w << s) & sign) ^ base, with sign and base
passed as arguments so that ptxas can fuse the AND and the XOR (two immediates do not fit one LOP3).
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import mma_v2

from .gluon_ws import _barrier, _epilogue

TOKENS = gl.constexpr(16)  # the tile's columns: mma.sync's N is 8, two of them


@gluon.jit
def _pair(w, P: gl.constexpr, sign, base):
    """Pair p of every word -> int16 [..., 2 (e)]: bits p and p + 16 become the sign bits of base."""
    v = ((w << (15 - P)) & sign) ^ base
    return gl.join(v.to(gl.int16), (v >> 16).to(gl.int16))


@gluon.jit
def _rows(w, RS: gl.constexpr, sign, base):
    """Rows r0 + 8 RS of every lane's word -> [..., e, h, j % 2, j // 2] (pair p = 8 RS + 2 j + h)."""
    j0 = gl.join(_pair(w, 8 * RS + 0, sign, base), _pair(w, 8 * RS + 1, sign, base))
    j1 = gl.join(_pair(w, 8 * RS + 2, sign, base), _pair(w, 8 * RS + 3, sign, base))
    j2 = gl.join(_pair(w, 8 * RS + 4, sign, base), _pair(w, 8 * RS + 5, sign, base))
    j3 = gl.join(_pair(w, 8 * RS + 6, sign, base), _pair(w, 8 * RS + 7, sign, base))
    return gl.join(gl.join(j0, j1), gl.join(j2, j3))


@gluon.jit
def _operand(words, sign, base, W: gl.constexpr, R: gl.constexpr, BLOCK_K: gl.constexpr):
    """int32 words [W, G, KCH, 32] -> int16 bit patterns [W, R, BLOCK_K] (fragments.py's order; as
    fragment_kernels._bf16_operand, with sign and base as values)."""
    G: gl.constexpr = R // 16
    w = gl.reshape(words, (W * G, BLOCK_K // 64, 8, 4))
    t = gl.join(_rows(w, 0, sign, base), _rows(w, 1, sign, base))  # [g, kch, r0, c, e, h, jl, jh, rs]
    t = gl.permute(t, (0, 8, 2, 1, 7, 6, 5, 3, 4))  # [g, rs, r0, kch, jh, jl, h, c, e]
    return gl.reshape(t, (W, R, BLOCK_K))


@gluon.jit
def w1a16_small_kernel(x_ptr, w_ptr, out_ptr, part_ptr, count_ptr, rs_ptr, ro_ptr, xsum_ptr, bias_ptr, res_ptr,
                       gate_ptr, nw_ptr, M, N, K, KC, RPS, NORM_COLS, NORM_PART, norm_eps, sign, base,
                       HAS_OFFSET: gl.constexpr, HAS_BIAS: gl.constexpr, GELU: gl.constexpr, HEAD_DIM: gl.constexpr,
                       HAS_RESIDUAL: gl.constexpr, HAS_GATE: gl.constexpr, R: gl.constexpr, KCH: gl.constexpr,
                       SPLIT_K: gl.constexpr, num_warps: gl.constexpr):
    """x bf16/fp16 [M, K], M <= 16 (column scales applied); w int32 [NG, KC, 32] W1A16 fragment words; sign
    0x80008000 and base the bit pattern of 1.0 twice (int32) -> out [M, N], with kernels._epilogue's
    arguments. Grid (cdiv(N, R), SPLIT_K). SPLIT_K > 1: part float32 [SPLIT_K, M, N], count int32 [cdiv(N, R)]
    zero (the last share of a row tile adds all of them, in order, and zeroes its counter)."""
    W: gl.constexpr = num_warps
    BLOCK_K: gl.constexpr = 64 * KCH
    G: gl.constexpr = R // 16
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[W, 1, 1], instr_shape=[1, 16, 8])
    x_layout: gl.constexpr = gl.DotOperandLayout(1, mma, 2)
    # Lane 4 r0 + c of each warp loads word 4 r0 + c of each of its chunks (fragments.py)
    w_layout: gl.constexpr = gl.BlockedLayout([1, 1, KCH, 1], [1, 1, 1, 32], [W, 1, 1, 1], [3, 2, 1, 0])
    pid = gl.program_id(0)
    # This program's K steps (BLOCK_K columns): [first, end); warp b takes steps first + i W + b. The steps
    # that every warp has whole (inside K) run without masks, the rest after them with masks.
    steps = gl.cdiv(K, BLOCK_K)
    per_share = gl.cdiv(steps, SPLIT_K)
    first = gl.program_id(1) * per_share
    end = gl.minimum(first + per_share, steps)
    unmasked = gl.maximum(gl.minimum(end, K // BLOCK_K) - first, 0) // W  # whole steps of all W warps
    rounds = gl.cdiv(end - first, W)

    # Rows past N and tokens past M read the last ones (never stored), so that the loads need no mask.
    b = gl.arange(0, W, layout=gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(3, w_layout))))[:, None, None, None]
    g = gl.minimum(pid * G + gl.arange(0, G, layout=gl.SliceLayout(0, gl.SliceLayout(2, gl.SliceLayout(3, w_layout)))),
                   gl.cdiv(N, 16) - 1)[None, :, None, None]
    kc = gl.arange(0, KCH, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(3, w_layout))))[None, None, :, None]
    lane = gl.arange(0, 32, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, w_layout))))
    w_chunk = (first + b) * KCH + kc  # [W, 1, KCH, 1] at round 0
    w_ptrs = w_ptr + (g * KC + w_chunk) * 32 + lane[None, None, None, :]
    bx = gl.arange(0, W, layout=gl.SliceLayout(1, gl.SliceLayout(2, x_layout)))[:, None, None]
    offs_k = gl.arange(0, BLOCK_K, layout=gl.SliceLayout(0, gl.SliceLayout(2, x_layout)))[None, :, None]
    tokens = gl.minimum(gl.arange(0, TOKENS, layout=gl.SliceLayout(0, gl.SliceLayout(1, x_layout))), M - 1)
    x_col = (first + bx) * BLOCK_K + offs_k  # [W, BLOCK_K, 1] at round 0
    x_ptrs = x_ptr + tokens[None, None, :] * K + x_col
    W_ROUND: gl.constexpr = W * KCH * 32  # words and columns a round moves on
    X_ROUND: gl.constexpr = W * BLOCK_K

    acc = gl.zeros([W, R, TOKENS], gl.float32, mma)
    # Two rounds in flight: this one's operands are loaded two rounds before its arithmetic.
    words = gl.load(w_ptrs)
    xt = gl.load(x_ptrs)
    words_next = words
    x_next = xt
    if 1 < unmasked:
        words_next = gl.load(w_ptrs + W_ROUND)
        x_next = gl.load(x_ptrs + X_ROUND)
    for i in range(unmasked):
        w_now = words
        x_now = xt
        words = words_next
        xt = x_next
        if i + 2 < unmasked:
            words_next = gl.load(w_ptrs + (i + 2) * W_ROUND)
            x_next = gl.load(x_ptrs + (i + 2) * X_ROUND)
        a = _operand(w_now, sign, base, W, R, BLOCK_K).to(x_ptr.dtype.element_ty, bitcast=True)
        acc = mma_v2(gl.convert_layout(a, gl.DotOperandLayout(0, mma, 2)), x_now, acc)
    for i in range(unmasked, rounds):  # steps past this share or past K: zero words and activations
        w_in = (first + i * W + b < end) & (w_chunk + i * W * KCH < KC)
        words = gl.load(w_ptrs + i * W_ROUND, mask=w_in, other=0)
        xt = gl.load(x_ptrs + i * X_ROUND, mask=(first + i * W + bx < end) & (x_col + i * X_ROUND < K), other=0.0)
        a = _operand(words, sign, base, W, R, BLOCK_K).to(x_ptr.dtype.element_ty, bitcast=True)
        acc = mma_v2(gl.convert_layout(a, gl.DotOperandLayout(0, mma, 2)), xt, acc)

    # The warps' parts of the share, [R, TOKENS], spread over the warps again (each holds all of the sum),
    # threads along N: out's rows are written in contiguous pieces.
    out_layout: gl.constexpr = gl.BlockedLayout([R // 32, 1], [32, 1], [1, W], [0, 1])
    y = gl.convert_layout(gl.sum(acc, axis=0), out_layout)
    offs_n = pid * R + gl.arange(0, R, layout=gl.SliceLayout(1, out_layout))
    offs_m = gl.arange(0, TOKENS, layout=gl.SliceLayout(0, out_layout))
    last = True
    if SPLIT_K > 1:
        offs = offs_m[None, :] * N + offs_n[:, None]
        mask = (offs_n < N)[:, None] & (offs_m < M)[None, :]
        gl.store(part_ptr + gl.program_id(1) * M * N + offs, y, mask=mask)
        # As fragment_kernels._shares_sum: every thread's stores before one release of the count, the last
        # share's acquire before its loads (.cg: from L2, where the other programs wrote).
        _barrier()
        last = gl.atomic_add(count_ptr + pid, 1, sem="acq_rel", scope="gpu") == SPLIT_K - 1
        if last:
            y = gl.zeros_like(y)
            for s in gl.static_range(SPLIT_K):
                y += gl.load(part_ptr + s * M * N + offs, mask=mask, other=0.0, cache_modifier=".cg")
            gl.atomic_xchg(count_ptr + pid, 0, sem="relaxed", scope="gpu")  # zero for the next launch
    if last:
        _epilogue(y, offs_n, offs_m, M, N, out_ptr, rs_ptr, ro_ptr, xsum_ptr, bias_ptr, res_ptr, gate_ptr, nw_ptr, RPS,
                  NORM_COLS, NORM_PART, norm_eps, HAS_OFFSET, HAS_BIAS, GELU, HEAD_DIM, HAS_RESIDUAL, HAS_GATE, R)
