"""W1A8 and W1A16 on Hopper in Gluon, warp-specialized: the tensor cores never wait for the weights' unpacking.

In every single-partition kernel that expands the weights inside its wgmma loop (Triton's fragment and
k-major kernels, Gluon kernels that unpack into registers or into shared memory) ptxas either keeps the
wgmmas synchronous or serializes them itself, reporting C7513 / C7515 ("wgmma.mma_async instructions are
serialized due to non wgmma instructions defining input / accumulator registers of a wgmma between start
and end of the pipeline stage"). Either way the tensor cores idle while the weights are expanded
(benchmarks/triton_sass.py shows which kernel gets which).

Here the work is split between the warps of one program (Gluon's warp_specialize):
- the default partition (the MMA warps) only waits for full buffers, issues wgmma with both operands in
  shared memory, keeps one in flight, and frees the buffers of the step before; then the epilogue;
- a worker partition of 4 load warps expands the 1-bit weights from the fragment words (fragments.py) into
  int8 {0, 1} or bf16/fp16 +-1 tiles in a ring of shared-memory buffers, and has TMA copy the activation
  tiles (int8 or bf16/fp16, [BLOCK_M, BLOCK_K]) into theirs. (A separate 1-warp TMA partition would pad
  an 8-MMA-warp program to 16 warps, where ptxas gives each thread 128 registers instead of 168.)
ptxas keeps this wgmma loop asynchronous (tests/test_kernel_gluon.py).

Each program computes out^T[BLOCK_N, BLOCK_M] = W[BLOCK_N, K] @ x^T[K, BLOCK_M], then kernels._epilogue's
formula and fused row operations (row scale, row offset x row sums, bias, GELU, head norms, residual +
gate) except the low-rank term. No group scales; column scales are folded into x before (as ops.w1a16 does
for the fragment kernel).

Two schedules (STREAM_K): one program per output tile, or one program per SM working through its share
of all the tiles' K steps (schedule.py: stream-K). Under stream-K both partitions walk the same pieces, the
ring of buffers running on from one piece to the next, so the load warps fill it for the next tile while
the MMA warps run the last one's epilogue.
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                              warpgroup_mma_wait)

from .fragment_kernels import _bf16_operand, _int8_operand
from .schedule import _next_piece, _piece_slot, _step_owner, _this_share, _tile_coords, _tile_ids

# TMA's global -> shared copy: async_copy_global_to_shared in Triton 3.6 (the lent GPUs'), async_load from 3.7.
_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
_barrier = getattr(gl, "barrier", None) or gl.thread_barrier  # renamed in Triton 3.7
LOAD_WARPS = gl.constexpr(4)
LOAD_REGS = gl.constexpr(96)  # setmaxnreg of the load warps (the MMA warps get the rest of the register file)

# ---- the weight tiles, by the Triton fragment kernels' own expansion (elementwise ops and joins: Gluon infers
# their layouts)


@gluon.jit
def _int8_tile(words, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr):
    """int32 words [G, KCH * 64] -> int8 {0, 1} [BLOCK_N, BLOCK_K]."""
    w0, w1 = gl.split(gl.reshape(words, (BLOCK_N // 16, BLOCK_K // 128, 8, 4, 2)))
    return _int8_operand(w0, w1, BLOCK_N, BLOCK_K, False)


@gluon.jit
def _half_tile(words, ONES: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr):
    """int32 words [G, KCH * 32] -> int16 bit patterns of +-1 [BLOCK_N, BLOCK_K]."""
    return _bf16_operand(gl.reshape(words, (BLOCK_N // 16, BLOCK_K // 64, 8, 4)), ONES, ONES, BLOCK_N, BLOCK_K)


# ---- partitions


@gluon.jit
def _epilogue(y, offs_n, offs_m, M, N, out_ptr, rs_ptr, ro_ptr, xsum_ptr, bias_ptr, res_ptr, gate_ptr, nw_ptr, RPS,
              NORM_COLS, NORM_PART, norm_eps, HAS_OFFSET: gl.constexpr, HAS_BIAS: gl.constexpr, GELU: gl.constexpr,
              HEAD_DIM: gl.constexpr, HAS_RESIDUAL: gl.constexpr, HAS_GATE: gl.constexpr, BLOCK_N: gl.constexpr):
    """kernels._epilogue on the transposed tile y [BLOCK_N, BLOCK_M] (without the low-rank term)."""
    mask_n = offs_n < N
    mask_m = offs_m < M
    y = y * gl.load(rs_ptr + offs_n, mask=mask_n, other=0.0)[:, None]
    if HAS_OFFSET:
        xsum = gl.load(xsum_ptr + offs_m, mask=mask_m, other=0.0)
        y += gl.load(ro_ptr + offs_n, mask=mask_n, other=0.0)[:, None] * xsum[None, :]
    if HAS_BIAS:
        y += gl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(gl.float32)[:, None]
    if GELU:  # as kernels._gelu_tanh
        u = 0.7978845608028654 * (y + 0.044715 * y * y * y)
        y = y / (1.0 + gl.exp(-2.0 * u))
    if HEAD_DIM > 0:  # as kernels._head_norms, heads along the first dimension
        head = (offs_n % BLOCK_N // HEAD_DIM)[:, None]  # the tile holds whole heads
        rstd = gl.zeros_like(y)
        for h in gl.static_range(BLOCK_N // HEAD_DIM):
            mean_sq = gl.sum(gl.where(head == h, y * y, 0.0), axis=0) / HEAD_DIM
            rstd = gl.where(head == h, gl.rsqrt(mean_sq + norm_eps)[None, :], rstd)
        normed = offs_n < NORM_COLS
        w = gl.load(nw_ptr + (offs_n // NORM_PART) * HEAD_DIM + offs_n % HEAD_DIM, mask=normed, other=1.0)
        y = gl.where(normed[:, None], y * rstd * w.to(gl.float32)[:, None], y)
    mask = mask_n[:, None] & mask_m[None, :]
    if HAS_RESIDUAL:
        if HAS_GATE:
            y = y * gl.load(gate_ptr + (offs_m // RPS)[None, :] * N + offs_n[:, None], mask=mask, other=0.0).to(gl.float32)
        y += gl.load(res_ptr + offs_m[None, :] * N + offs_n[:, None], mask=mask, other=0.0).to(gl.float32)
    gl.store(out_ptr + offs_m[None, :] * N + offs_n[:, None], y.to(out_ptr.dtype.element_ty), mask=mask)


@gluon.jit
def _mma_steps(a_smem, x_smem, a_ready, x_ready, empty, acc, step, n_steps, STAGES: gl.constexpr):
    """n_steps K steps into acc, from ring position `step` on. Returns acc complete; the last step's buffers
    are still held (the others went back to the load warps)."""
    for i in range(n_steps):
        s = (step + i) % STAGES
        mbarrier.wait(a_ready.index(s), ((step + i) // STAGES) & 1)
        mbarrier.wait(x_ready.index(s), ((step + i) // STAGES) & 1)
        acc = warpgroup_mma(a_smem.index(s), x_smem.index(s).permute((1, 0)), acc, is_async=True)
        # Step i - 1's wgmma is done after this: its two buffers go back to the load warps.
        acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
        mbarrier.arrive(empty.index((step + i + STAGES - 1) % STAGES), pred=i > 0)
    return warpgroup_mma_wait(num_outstanding=0, deps=(acc,))


@gluon.jit
def _dequant(acc, offs_m, M, xs_ptr, qsum_ptr, INT8: gl.constexpr):
    """int8 {0, 1} products -> sum_k q (2 b - 1) times the token's quantization scale; float32 ones as they are."""
    if INT8:
        mask_m = offs_m < M
        qsum = gl.load(qsum_ptr + offs_m, mask=mask_m, other=0)
        y = (2 * acc - qsum[None, :]).to(gl.float32) * gl.load(xs_ptr + offs_m, mask=mask_m, other=0.0)[None, :]
    else:
        y = acc
    return y


@gluon.jit
def _tile_out(acc, offs_n, off_m, M, N, out_ptr, xs_ptr, qsum_ptr, rs_ptr, ro_ptr, xsum_ptr, bias_ptr, res_ptr,
              gate_ptr, nw_ptr, RPS, NORM_COLS, NORM_PART, norm_eps, INT8: gl.constexpr, HAS_OFFSET: gl.constexpr,
              HAS_BIAS: gl.constexpr, GELU: gl.constexpr, HEAD_DIM: gl.constexpr, HAS_RESIDUAL: gl.constexpr,
              HAS_GATE: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr):
    """A whole tile's products acc [BLOCK_N, BLOCK_M], in the epilogue's layout -> out."""
    out_layout: gl.constexpr = acc.type.layout
    offs_m = off_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, out_layout))
    y = _dequant(acc, offs_m, M, xs_ptr, qsum_ptr, INT8)
    if HAS_RESIDUAL:  # one half of the tokens after the other: the whole tile's residual and gate beside it spill
        HALF: gl.constexpr = BLOCK_M // 2
        y0, y1 = gl.split(gl.permute(gl.reshape(y, (BLOCK_N, 2, HALF)), (0, 2, 1)))
        halves = gl.arange(0, HALF, layout=gl.SliceLayout(0, out_layout))
        _epilogue(gl.convert_layout(y0, out_layout, assert_trivial=True), offs_n, off_m + halves, M, N, out_ptr, rs_ptr,
                  ro_ptr, xsum_ptr, bias_ptr, res_ptr, gate_ptr, nw_ptr, RPS, NORM_COLS, NORM_PART, norm_eps, HAS_OFFSET,
                  HAS_BIAS, GELU, HEAD_DIM, HAS_RESIDUAL, HAS_GATE, BLOCK_N)
        _epilogue(gl.convert_layout(y1, out_layout, assert_trivial=True), offs_n, off_m + HALF + halves, M, N, out_ptr,
                  rs_ptr, ro_ptr, xsum_ptr, bias_ptr, res_ptr, gate_ptr, nw_ptr, RPS, NORM_COLS, NORM_PART, norm_eps,
                  HAS_OFFSET, HAS_BIAS, GELU, HEAD_DIM, HAS_RESIDUAL, HAS_GATE, BLOCK_N)
    else:
        _epilogue(y, offs_n, offs_m, M, N, out_ptr, rs_ptr, ro_ptr, xsum_ptr, bias_ptr, res_ptr, gate_ptr, nw_ptr, RPS,
                  NORM_COLS, NORM_PART, norm_eps, HAS_OFFSET, HAS_BIAS, GELU, HEAD_DIM, HAS_RESIDUAL, HAS_GATE, BLOCK_N)


@gluon.jit
def _piece_out(acc, tile, tile_steps, steps, part_ptr, count_ptr, offs_n, off_m, M, N, out_ptr, xs_ptr, qsum_ptr,
               rs_ptr, ro_ptr, xsum_ptr, bias_ptr, res_ptr, gate_ptr, nw_ptr, RPS, NORM_COLS, NORM_PART, norm_eps,
               INT8: gl.constexpr, HAS_OFFSET: gl.constexpr, HAS_BIAS: gl.constexpr, GELU: gl.constexpr,
               HEAD_DIM: gl.constexpr, HAS_RESIDUAL: gl.constexpr, HAS_GATE: gl.constexpr, BLOCK_M: gl.constexpr,
               BLOCK_N: gl.constexpr):
    """One piece of a split tile (schedule.py): its products acc [BLOCK_N, BLOCK_M] go to this program's slot of
    part [2 programs, BLOCK_M, BLOCK_N] (int32 or float32, as acc), counted in count [tile]. The tile's last piece
    to be counted adds all of them in program order, 64 tokens at a time (a sum, a loaded piece and the
    epilogue's operands beside it spill with more), writes out and zeroes the counter for the next launch."""
    out_layout: gl.constexpr = acc.type.layout
    TILE: gl.constexpr = BLOCK_M * BLOCK_N
    PART: gl.constexpr = 64
    program = gl.program_id(0)
    programs = gl.num_programs(0)
    rows = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, out_layout))[:, None]  # N along each thread: 32-byte stores
    tokens = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, out_layout))[None, :]
    gl.store(part_ptr + _piece_slot(program, tile, tile_steps, programs, steps) * TILE + tokens * BLOCK_N + rows, acc)
    # As CUTLASS's split-K semaphore: every thread's stores come before one thread's release of the count, and
    # the last piece's acquire before its loads (.cg: from L2, where the other programs wrote).
    _barrier()
    first = _step_owner(tile * tile_steps, programs, steps)
    last = _step_owner(tile * tile_steps + tile_steps - 1, programs, steps)
    if gl.atomic_add(count_ptr + tile, 1, sem="acq_rel", scope="gpu") == last - first:
        part_tokens = gl.arange(0, PART, layout=gl.SliceLayout(0, out_layout))
        for t0 in range(0, BLOCK_M, PART):
            y = gl.zeros([BLOCK_N, PART], acc.dtype, out_layout)
            for q in range(first, last + 1):
                slot = _piece_slot(q, tile, tile_steps, programs, steps)
                y += gl.load(part_ptr + slot * TILE + (t0 + part_tokens)[None, :] * BLOCK_N + rows, cache_modifier=".cg")
            offs_m = off_m + t0 + part_tokens
            _epilogue(_dequant(y, offs_m, M, xs_ptr, qsum_ptr, INT8), offs_n, offs_m, M, N, out_ptr, rs_ptr, ro_ptr,
                      xsum_ptr, bias_ptr, res_ptr, gate_ptr, nw_ptr, RPS, NORM_COLS, NORM_PART, norm_eps, HAS_OFFSET,
                      HAS_BIAS, GELU, HEAD_DIM, HAS_RESIDUAL, HAS_GATE, BLOCK_N)
        gl.atomic_xchg(count_ptr + tile, 0, sem="relaxed", scope="gpu")


@gluon.constexpr_function
def _acc_layout(int8, block_m, warps):
    """The wgmma accumulator's layout. int8 wgmma: K 32 per instruction, N up to 224 (token tiles are powers of
    two, so 128); 16-bit: K 16, N up to 256."""
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[warps, 1],
                                     instr_shape=[16, min(block_m, 128), 32] if int8 else [16, min(block_m, 256), 16])


@gluon.constexpr_function
def _out_layout(warps):
    """The epilogue's layout: threads along N, so that out's rows are written in contiguous pieces."""
    return gl.BlockedLayout(size_per_thread=[8, 1], threads_per_warp=[16, 2], warps_per_cta=[1, warps], order=[0, 1])


@gluon.jit
def _mma_partition(a_smem, x_smem, a_ready, x_ready, empty, out_ptr, xs_ptr, qsum_ptr, rs_ptr, ro_ptr, xsum_ptr,
                   bias_ptr, res_ptr, gate_ptr, nw_ptr, M, N, K, RPS, NORM_COLS, NORM_PART, norm_eps, off_m, pid_n,
                   INT8: gl.constexpr, HAS_OFFSET: gl.constexpr, HAS_BIAS: gl.constexpr, GELU: gl.constexpr,
                   HEAD_DIM: gl.constexpr, HAS_RESIDUAL: gl.constexpr, HAS_GATE: gl.constexpr,
                   BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr,
                   STAGES: gl.constexpr, WARPS: gl.constexpr):
    """The MMA warps of a one-tile program: wait for full buffers, wgmma with one in flight, free the buffers of
    the step before; then the epilogue."""
    mma: gl.constexpr = _acc_layout(INT8, BLOCK_M, WARPS)
    out_layout: gl.constexpr = _out_layout(WARPS)
    acc = gl.zeros([BLOCK_N, BLOCK_M], gl.int32 if INT8 else gl.float32, mma)
    acc = _mma_steps(a_smem, x_smem, a_ready, x_ready, empty, acc, 0, gl.cdiv(K, BLOCK_K), STAGES)
    acc = gl.convert_layout(acc, out_layout)
    offs_n = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, out_layout))
    _tile_out(acc, offs_n, off_m, M, N, out_ptr, xs_ptr, qsum_ptr, rs_ptr, ro_ptr,
              xsum_ptr, bias_ptr, res_ptr, gate_ptr, nw_ptr, RPS, NORM_COLS, NORM_PART, norm_eps, INT8, HAS_OFFSET,
              HAS_BIAS, GELU, HEAD_DIM, HAS_RESIDUAL, HAS_GATE, BLOCK_M, BLOCK_N)


@gluon.jit
def _mma_stream_k(a_smem, x_smem, a_ready, x_ready, empty, part_ptr, count_ptr, out_ptr, xs_ptr, qsum_ptr, rs_ptr,
                  ro_ptr, xsum_ptr, bias_ptr, res_ptr, gate_ptr, nw_ptr, M, N, K, RPS, NORM_COLS, NORM_PART, norm_eps,
                  INT8: gl.constexpr, HAS_OFFSET: gl.constexpr, HAS_BIAS: gl.constexpr, GELU: gl.constexpr,
                  HEAD_DIM: gl.constexpr, HAS_RESIDUAL: gl.constexpr, HAS_GATE: gl.constexpr,
                  BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, GROUP_M: gl.constexpr,
                  STAGES: gl.constexpr, WARPS: gl.constexpr):
    """The MMA warps of a stream-K program: each piece of its share as _mma_partition does a tile, then the
    epilogue of a whole tile, or _piece_out for a piece of a split one."""
    mma: gl.constexpr = _acc_layout(INT8, BLOCK_M, WARPS)
    out_layout: gl.constexpr = _out_layout(WARPS)
    tile_steps, steps, start, end = _this_share(M, N, K, BLOCK_M, BLOCK_N, BLOCK_K)
    step = 0  # ring position
    while start < end:
        tile, k_first, n_steps = _next_piece(start, end, tile_steps)
        acc = gl.zeros([BLOCK_N, BLOCK_M], gl.int32 if INT8 else gl.float32, mma)
        acc = _mma_steps(a_smem, x_smem, a_ready, x_ready, empty, acc, step, n_steps, STAGES)
        mbarrier.arrive(empty.index((step + n_steps - 1) % STAGES))  # the piece's last buffers
        acc = gl.convert_layout(acc, out_layout)
        pid_m, pid_n = _tile_coords(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        offs_n = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, out_layout))
        if n_steps == tile_steps:
            _tile_out(acc, offs_n, pid_m * BLOCK_M, M, N, out_ptr, xs_ptr, qsum_ptr, rs_ptr, ro_ptr, xsum_ptr, bias_ptr,
                      res_ptr, gate_ptr, nw_ptr, RPS, NORM_COLS, NORM_PART, norm_eps, INT8, HAS_OFFSET, HAS_BIAS, GELU,
                      HEAD_DIM, HAS_RESIDUAL, HAS_GATE, BLOCK_M, BLOCK_N)
        else:
            _piece_out(acc, tile, tile_steps, steps, part_ptr, count_ptr, offs_n, pid_m * BLOCK_M, M, N, out_ptr, xs_ptr,
                       qsum_ptr, rs_ptr, ro_ptr, xsum_ptr, bias_ptr, res_ptr, gate_ptr, nw_ptr, RPS, NORM_COLS,
                       NORM_PART, norm_eps, INT8, HAS_OFFSET, HAS_BIAS, GELU, HEAD_DIM, HAS_RESIDUAL, HAS_GATE, BLOCK_M,
                       BLOCK_N)
        step += n_steps
        start += n_steps


@gluon.jit
def _load_steps(a_smem, a_ready, x_desc, x_smem, x_ready, empty, w_ptr, N, KC, off_m, pid_n, k_first, n_steps, step,
                ONES: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, STAGES: gl.constexpr):
    """Fills both rings for n_steps K steps of one tile from K step k_first and ring position `step` on: the
    activation tile by TMA, the weight tile expanded from the fragment words. ONES == 0: int8 tiles from W1A8
    words (64 per 128 columns); else +-1 in the 16-bit float whose 1.0 is ONES, from W1A16 words (32 per 64
    columns)."""
    G: gl.constexpr = BLOCK_N // 16
    WORDS: gl.constexpr = BLOCK_K // 2  # per 16-row group and K step
    # Lane 4 r0 + c of the warp holding group g loads, of each chunk, words 2 (4 r0 + c) + th (int8, 64 a chunk)
    # or word 4 r0 + c (16-bit, 32 a chunk).
    PER_LANE: gl.constexpr = 2 if ONES == 0 else 1
    w_layout: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, PER_LANE], threads_per_warp=[1, 32],
                                              warps_per_cta=[LOAD_WARPS, 1], order=[1, 0])
    offs_g = pid_n * G + gl.arange(0, G, layout=gl.SliceLayout(1, w_layout))
    offs_j = gl.arange(0, WORDS, layout=gl.SliceLayout(0, w_layout))
    w_ptrs = w_ptr + offs_g[:, None] * (KC * (32 * PER_LANE)) + k_first * WORDS + offs_j[None, :]
    w_mask = (offs_g < gl.cdiv(N, 16))[:, None]
    words = gl.load(w_ptrs, mask=w_mask, other=0)
    for i in range(n_steps):
        s = (step + i) % STAGES
        if ONES == 0:
            tile = _int8_tile(words, BLOCK_N, BLOCK_K)
        else:
            tile = _half_tile(words, ONES * 0x10001, BLOCK_N, BLOCK_K).to(a_smem.dtype, bitcast=True)
        # Next step's, early. (By TMA into shared memory a few steps ahead instead, no load is in flight at the
        # fence below; on an H100 that was no faster: benchmarks/RESULTS.md, eighth session.)
        words = gl.load(w_ptrs + (i + 1) * WORDS, mask=w_mask & (i + 1 < n_steps), other=0)
        mbarrier.wait(empty.index(s), (((step + i) // STAGES) & 1) ^ 1)  # the first pass finds every buffer free
        mbarrier.expect(x_ready.index(s), x_desc.block_type.nbytes)
        _tma_load(x_desc, [off_m, (k_first + i) * BLOCK_K], x_ready.index(s), x_smem.index(s))
        a_smem.index(s).store(tile)
        fence_async_shared()
        mbarrier.arrive(a_ready.index(s))


@gluon.jit
def _load_partition(a_smem, a_ready, x_desc, x_smem, x_ready, empty, w_ptr, N, K, KC, off_m, pid_n,
                    ONES: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, STAGES: gl.constexpr):
    """The load warps of a one-tile program."""
    _load_steps(a_smem, a_ready, x_desc, x_smem, x_ready, empty, w_ptr, N, KC, off_m, pid_n, 0, gl.cdiv(K, BLOCK_K), 0,
                ONES, BLOCK_N, BLOCK_K, STAGES)


@gluon.jit
def _load_stream_k(a_smem, a_ready, x_desc, x_smem, x_ready, empty, w_ptr, M, N, K, KC, ONES: gl.constexpr,
                   BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, GROUP_M: gl.constexpr, STAGES: gl.constexpr):
    """The load warps of a stream-K program: the pieces of its share, as _mma_stream_k walks them."""
    BLOCK_M: gl.constexpr = x_desc.block_type.shape[0]
    tile_steps, _, start, end = _this_share(M, N, K, BLOCK_M, BLOCK_N, BLOCK_K)
    step = 0
    while start < end:
        tile, k_first, n_steps = _next_piece(start, end, tile_steps)
        pid_m, pid_n = _tile_coords(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        _load_steps(a_smem, a_ready, x_desc, x_smem, x_ready, empty, w_ptr, N, KC, pid_m * BLOCK_M, pid_n, k_first,
                    n_steps, step, ONES, BLOCK_N, BLOCK_K, STAGES)
        step += n_steps
        start += n_steps


@gluon.jit
def _ws_kernel(x_desc, w_ptr, out_ptr, part_ptr, count_ptr, xs_ptr, qsum_ptr, rs_ptr, ro_ptr, xsum_ptr, bias_ptr,
               res_ptr, gate_ptr, nw_ptr, M, N, K, KC, RPS, NORM_COLS, NORM_PART, norm_eps, ONES: gl.constexpr,
               HAS_OFFSET: gl.constexpr, HAS_BIAS: gl.constexpr, GELU: gl.constexpr, HEAD_DIM: gl.constexpr,
               HAS_RESIDUAL: gl.constexpr, HAS_GATE: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
               GROUP_M: gl.constexpr, STREAM_K: gl.constexpr, num_warps: gl.constexpr):
    BLOCK_M: gl.constexpr = x_desc.block_type.shape[0]
    BLOCK_K: gl.constexpr = x_desc.block_type.shape[1]
    a_smem = gl.allocate_shared_memory(x_desc.dtype, [STAGES, BLOCK_N, BLOCK_K],
                                       gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_K], x_desc.dtype))
    x_smem = gl.allocate_shared_memory(x_desc.dtype, [STAGES, BLOCK_M, BLOCK_K], x_desc.layout)
    a_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    x_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(a_ready.index(i), count=1)
        mbarrier.init(x_ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=1)
    if STREAM_K:
        gl.warp_specialize((
            (_mma_stream_k, (a_smem, x_smem, a_ready, x_ready, empty, part_ptr, count_ptr, out_ptr, xs_ptr, qsum_ptr,
                             rs_ptr, ro_ptr, xsum_ptr, bias_ptr, res_ptr, gate_ptr, nw_ptr, M, N, K, RPS, NORM_COLS,
                             NORM_PART, norm_eps, ONES == 0, HAS_OFFSET, HAS_BIAS, GELU, HEAD_DIM, HAS_RESIDUAL,
                             HAS_GATE, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, STAGES, num_warps)),
            (_load_stream_k, (a_smem, a_ready, x_desc, x_smem, x_ready, empty, w_ptr, M, N, K, KC, ONES, BLOCK_N,
                              BLOCK_K, GROUP_M, STAGES)),
        ), [LOAD_WARPS], [LOAD_REGS])
    else:
        pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
        off_m = pid_m * BLOCK_M
        gl.warp_specialize((
            (_mma_partition, (a_smem, x_smem, a_ready, x_ready, empty, out_ptr, xs_ptr, qsum_ptr, rs_ptr, ro_ptr,
                              xsum_ptr, bias_ptr, res_ptr, gate_ptr, nw_ptr, M, N, K, RPS, NORM_COLS, NORM_PART,
                              norm_eps, off_m, pid_n, ONES == 0, HAS_OFFSET, HAS_BIAS, GELU, HEAD_DIM, HAS_RESIDUAL,
                              HAS_GATE, BLOCK_M, BLOCK_N, BLOCK_K, STAGES, num_warps)),
            (_load_partition, (a_smem, a_ready, x_desc, x_smem, x_ready, empty, w_ptr, N, K, KC, off_m, pid_n, ONES,
                               BLOCK_N, BLOCK_K, STAGES)),
        ), [LOAD_WARPS], [LOAD_REGS])


@gluon.jit
def w1a8_ws_kernel(q_desc, w_ptr, out_ptr, part_ptr, count_ptr, xs_ptr, qsum_ptr, rs_ptr, ro_ptr, xsum_ptr, bias_ptr,
                   res_ptr, gate_ptr, nw_ptr, M, N, K, KC, RPS, NORM_COLS, NORM_PART, norm_eps,
                   HAS_OFFSET: gl.constexpr, HAS_BIAS: gl.constexpr, GELU: gl.constexpr, HEAD_DIM: gl.constexpr,
                   HAS_RESIDUAL: gl.constexpr, HAS_GATE: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                   GROUP_M: gl.constexpr, STREAM_K: gl.constexpr, num_warps: gl.constexpr):
    """q int8 [M, K] through q_desc (block [BLOCK_M, BLOCK_K], BLOCK_K 128; K a multiple of 16), its scales xs
    and row sums qsum; w int32 [NG, KC, 64] W1A8 fragment words -> out [M, N], with kernels._epilogue's
    arguments. num_warps: the MMA warps (4 per 64 weight rows of the tile); 4 load warps are added.
    STREAM_K: one program per SM (grid), with part int32 [2 programs, BLOCK_M x BLOCK_N] and count int32 [tiles],
    zero; else one program per tile (part and count unused)."""
    _ws_kernel(q_desc, w_ptr, out_ptr, part_ptr, count_ptr, xs_ptr, qsum_ptr, rs_ptr, ro_ptr, xsum_ptr, bias_ptr,
               res_ptr, gate_ptr, nw_ptr, M, N, K, KC, RPS, NORM_COLS, NORM_PART, norm_eps, 0, HAS_OFFSET, HAS_BIAS,
               GELU, HEAD_DIM, HAS_RESIDUAL, HAS_GATE, BLOCK_N, STAGES, GROUP_M, STREAM_K, num_warps)


@gluon.jit
def w1a16_ws_kernel(x_desc, w_ptr, out_ptr, part_ptr, count_ptr, rs_ptr, ro_ptr, xsum_ptr, bias_ptr, res_ptr, gate_ptr,
                    nw_ptr, M, N, K, KC, RPS, NORM_COLS, NORM_PART, norm_eps, ONE_BITS: gl.constexpr,
                    HAS_OFFSET: gl.constexpr, HAS_BIAS: gl.constexpr, GELU: gl.constexpr, HEAD_DIM: gl.constexpr,
                    HAS_RESIDUAL: gl.constexpr, HAS_GATE: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                    GROUP_M: gl.constexpr, STREAM_K: gl.constexpr, num_warps: gl.constexpr):
    """x bf16/fp16 [M, K] (column scales applied) through x_desc (block [BLOCK_M, BLOCK_K], BLOCK_K 64; K a
    multiple of 8); w int32 [NG, KC, 32] W1A16 fragment words; ONE_BITS: 1.0 in x's dtype -> out [M, N].
    STREAM_K as w1a8_ws_kernel's, part float32."""
    _ws_kernel(x_desc, w_ptr, out_ptr, part_ptr, count_ptr, rs_ptr, rs_ptr, rs_ptr, ro_ptr, xsum_ptr, bias_ptr, res_ptr,
               gate_ptr, nw_ptr, M, N, K, KC, RPS, NORM_COLS, NORM_PART, norm_eps, ONE_BITS, HAS_OFFSET, HAS_BIAS,
               GELU, HEAD_DIM, HAS_RESIDUAL, HAS_GATE, BLOCK_N, STAGES, GROUP_M, STREAM_K, num_warps)
