"""W1A16 for few rows (M <= 16) in Gluon, by mma.sync: the weights go from their words straight into the
tensor cores' A-operand registers, and each program's whole K share is in flight at once.

At M <= 16 the work is the weights' bytes, and what limits a kernel is how many of them are on their way from
memory at a time. The fragment kernel at M <= 16 keeps 4 K steps in flight (cp.async) and expands the words
into wgmma's register operand, where ptxas waits for each wgmma before the next expansion (17 waits for 16
wgmmas a step, benchmarks/RESULTS.md). Here a program of R weight rows and CH chunks of 64 columns (its K
share; SPLIT_K shares) asks TMA for all of its words and activations at the start, one mbarrier per chunk,
then expands each chunk's words into mma.sync's A registers (Ampere's m16n8k16, the same lane layout as
wgmma's: fragments.py) and multiplies them with the activations read by ldmatrix. Loading the words and the
activations straight into registers instead, one or two steps ahead, was 1.2-1.6x slower than the fragment
kernel (commit a8a8056; benchmarks/RESULTS.md, ninth session).

Per pair of weights the expansion is one shift and one LOP3: ((w << s) & sign) ^ base, with sign and base
passed as arguments so that ptxas can fuse the AND and the XOR (two immediates do not fit one LOP3).
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import mma_v2
from triton.experimental.gluon.language.nvidia.hopper import mbarrier

from .gluon_ws import _barrier, _epilogue, _tma_load

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
def w1a16_small_kernel(x_desc, w_desc, out_ptr, part_ptr, count_ptr, rs_ptr, ro_ptr, xsum_ptr, bias_ptr, res_ptr,
                       gate_ptr, nw_ptr, M, N, K, RPS, NORM_COLS, NORM_PART, norm_eps, sign, base,
                       HAS_OFFSET: gl.constexpr, HAS_BIAS: gl.constexpr, GELU: gl.constexpr, HEAD_DIM: gl.constexpr,
                       HAS_RESIDUAL: gl.constexpr, HAS_GATE: gl.constexpr, CH: gl.constexpr,
                       SPLIT_K: gl.constexpr, num_warps: gl.constexpr):
    """x bf16/fp16 [M, K], M <= 16 (column scales applied), through x_desc (block [16, 64]); the W1A16 fragment
    words int32 [NG, KC, 32] through w_desc (block [R / 16, 1, 32]: R rows; CH chunks of 64 columns a
    program); sign 0x80008000 and base the bit pattern of 1.0 twice (int32) -> out [M, N], with
    kernels._epilogue's arguments. Grid (cdiv(N, R), SPLIT_K), SPLIT_K * CH >= KC. SPLIT_K > 1: part float32
    [SPLIT_K, M, N], count int32 [cdiv(N, R)] zero (the last share of a row tile adds all of them, in order,
    and zeroes its counter). TMA brings the program's whole share at once (zero past M, K and the words)."""
    W: gl.constexpr = num_warps
    G: gl.constexpr = w_desc.block_type.shape[0]
    R: gl.constexpr = 16 * G
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[W, 1], instr_shape=[16, 8])
    # Group g's words on warp g % W, lane 4 r0 + c holding word 4 r0 + c: the A operand's rows (fragments.py)
    w_layout: gl.constexpr = gl.BlockedLayout([1, 1, 1], [1, 1, 32], [W, 1, 1], [2, 1, 0])
    pid = gl.program_id(0)
    chunk0 = gl.program_id(1) * CH

    words = gl.allocate_shared_memory(gl.int32, [CH, G, 1, 32], w_desc.layout)
    xs = gl.allocate_shared_memory(x_desc.dtype, [CH, TOKENS, 64], x_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [CH, 1], mbarrier.MBarrierLayout())
    for c in gl.static_range(CH):
        mbarrier.init(ready.index(c), count=1)
    # Everything in flight at once, a barrier per chunk of 64 columns.
    for c in gl.static_range(CH):
        mbarrier.expect(ready.index(c), w_desc.block_type.nbytes + x_desc.block_type.nbytes)
        _tma_load(w_desc, [pid * G, chunk0 + c, 0], ready.index(c), words.index(c))
        _tma_load(x_desc, [0, (chunk0 + c) * 64], ready.index(c), xs.index(c))

    # Chunks past K hold zero words and zero activations: they add nothing, so every share runs all CH of them
    # (unrolled), into two sums, so that each chain of dependent mma.sync is half as long.
    acc0 = gl.zeros([R, TOKENS], gl.float32, mma)
    acc1 = gl.zeros([R, TOKENS], gl.float32, mma)
    for c in gl.static_range(CH):
        mbarrier.wait(ready.index(c), 0)
        w = words.index(c).load(w_layout)
        a = gl.reshape(_operand(w, sign, base, 1, R, 64), (R, 64)).to(x_desc.dtype, bitcast=True)
        a = gl.convert_layout(a, gl.DotOperandLayout(0, mma, 2))
        xt = xs.index(c).permute((1, 0)).load(gl.DotOperandLayout(1, mma, 2))
        if c % 2 == 0:
            acc0 = mma_v2(a, xt, acc0)
        else:
            acc1 = mma_v2(a, xt, acc1)
    acc = acc0 + acc1
    for c in gl.static_range(CH):
        mbarrier.invalidate(ready.index(c))

    # Threads along N: out's rows are written in contiguous pieces.
    out_layout: gl.constexpr = gl.BlockedLayout([R // 32, 1], [32, 1], [1, W], [0, 1])
    y = gl.convert_layout(acc, out_layout)
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
