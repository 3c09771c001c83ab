"""Triton kernels for y = x @ W.T with a packed 1-bit W (see packed.py for the formula).

Both GEMMs read the K-major signs of layout.py, a [BLOCK_K/8, BLOCK_N] byte tile per step, and
expand it to a [BLOCK_K, BLOCK_N] operand in registers: the unpacked weight never touches
global memory.

- w1a16_kernel: x in bf16/fp16; each sign becomes the bit pattern of +-1 (or of +-group_scale)
  by flipping the sign bit of a constant, so no integer-to-float conversion is needed.
  tl.dot accumulates in fp32; row scale, offset, low rank and bias are applied in the epilogue.
- w1a8_kernel: x quantized per token to int8 (quantize_rows_kernel, col_scale folded in first);
  signs expand to {0, 1} int8 and the int8 dot accumulates in int32. With s = 2b - 1,
  sum_k q_k s_k = 2 sum_k q_k b_k - sum_k q_k, so the row sums of q finish the +-1 product.
  Group scales are applied per group, which needs BLOCK_K to divide the group size.

Row operations (bonsai.kernels.fusion): quantize_rows_kernel applies the prologue (LayerNorm,
modulation) to its row before quantizing it; `_epilogue`, shared by all four GEMM kernels, applies
tanh-GELU, the q / k head RMSNorms and the gated residual after the bias. A head's RMSNorm needs
all its columns in one tile: with HEAD_DIM > 0 the launcher only runs tiles whose BLOCK_N is a
multiple of the head size (tiles start at multiples of BLOCK_N, so no head straddles two).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .schedule import _tile_ids


@triton.jit
def _sign_bits01(v, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """uint8 [BLOCK_K/8, BLOCK_N] -> int32 [BLOCK_K, BLOCK_N]: 1 where the sign is +1, else 0."""
    shifts = tl.arange(0, 8)
    bits = (v.to(tl.int32)[:, None, :] >> shifts[None, :, None]) & 1
    return tl.reshape(bits, (BLOCK_K, BLOCK_N))


@triton.jit
def _sign_mask15(v, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """uint8 [BLOCK_K/8, BLOCK_N] -> int32 [BLOCK_K, BLOCK_N]: 0x8000 where the sign is -1, else 0."""
    shifts = 15 - tl.arange(0, 8)
    flipped = v.to(tl.int32) ^ 0xFF
    bits = (flipped[:, None, :] << shifts[None, :, None]) & 0x8000
    return tl.reshape(bits, (BLOCK_K, BLOCK_N))


@triton.jit
def _gelu_tanh(y):
    """0.5 y (1 + tanh(u)) = y sigmoid(2u), u = sqrt(2/pi) (y + 0.044715 y^3): one exp (it may overflow to
    inf for very negative y, which gives the right limit 0)."""
    u = 0.7978845608028654 * (y + 0.044715 * y * y * y)
    return y / (1.0 + tl.exp(-2.0 * u))


@triton.jit
def _head_norms(y, offs_n, nw_ptr, NORM_COLS, NORM_PART, eps, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr):
    """RMSNorm of every HEAD_DIM-column head of y [BM, BLOCK_N] that lies in the first NORM_COLS columns,
    weighted by nw [parts, HEAD_DIM] (part = column // NORM_PART); the tile holds whole heads."""
    head = (tl.arange(0, BLOCK_N) // HEAD_DIM)[None, :]
    rstd = tl.zeros_like(y)
    for h in tl.static_range(BLOCK_N // HEAD_DIM):  # one masked row reduction per head of the tile
        mean_sq = tl.sum(tl.where(head == h, y * y, 0.0), axis=1) / HEAD_DIM
        rstd = tl.where(head == h, tl.rsqrt(mean_sq + eps)[:, None], rstd)
    normed = offs_n < NORM_COLS
    w = tl.load(nw_ptr + (offs_n // NORM_PART) * HEAD_DIM + offs_n % HEAD_DIM, mask=normed, other=1.0)
    return tl.where(normed[None, :], y * rstd * w.to(tl.float32)[None, :], y)


@triton.jit
def _epilogue(acc, offs_m, offs_n, M, N, out_ptr, rs_ptr, ro_ptr, xsum_ptr, xv_ptr, ut_ptr, bias_ptr,
              res_ptr, gate_ptr, nw_ptr, RPS, NORM_COLS, NORM_PART, norm_eps,
              HAS_OFFSET: tl.constexpr, RANK: tl.constexpr, HAS_BIAS: tl.constexpr,
              GELU: tl.constexpr, HEAD_DIM: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_GATE: tl.constexpr,
              BLOCK_N: tl.constexpr):
    """acc [BM, BN] fp32 (binary part without row scale) -> out = full formula, then the fused row
    operations: GELU, head norms (HEAD_DIM > 0), residual [M, N] + gate [M // RPS, N] * y (RPS: rows per
    sample). Stored in out's dtype."""
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = acc * tl.load(rs_ptr + offs_n, mask=mask_n, other=0.0)[None, :]
    if HAS_OFFSET:
        xsum = tl.load(xsum_ptr + offs_m, mask=mask_m, other=0.0)
        acc += xsum[:, None] * tl.load(ro_ptr + offs_n, mask=mask_n, other=0.0)[None, :]
    if RANK > 0:
        offs_r = tl.arange(0, RANK)
        xv = tl.load(xv_ptr + offs_m[:, None] * RANK + offs_r[None, :], mask=mask_m[:, None], other=0.0)
        ut = tl.load(ut_ptr + offs_r[:, None] * N + offs_n[None, :], mask=mask_n[None, :], other=0.0)
        acc = tl.dot(xv, ut, acc)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if GELU:
        acc = _gelu_tanh(acc)
    if HEAD_DIM > 0:
        acc = _head_norms(acc, offs_n, nw_ptr, NORM_COLS, NORM_PART, norm_eps, HEAD_DIM, BLOCK_N)
    mask = mask_m[:, None] & mask_n[None, :]
    if HAS_RESIDUAL:
        if HAS_GATE:
            gate_ptrs = gate_ptr + (offs_m // RPS)[:, None] * N + offs_n[None, :]
            acc = acc * tl.load(gate_ptrs, mask=mask, other=0.0).to(tl.float32)
        acc += tl.load(res_ptr + offs_m[:, None] * N + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
    out_ptrs = out_ptr + offs_m[:, None] * N + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def w1a16_kernel(x_ptr, wt_ptr, out_ptr, rs_ptr, cs_ptr, gsb_ptr, ro_ptr, xsum_ptr, xv_ptr, ut_ptr, bias_ptr,
                 res_ptr, gate_ptr, nw_ptr, M, N, K, M_BUCKET, RPS, NORM_COLS, NORM_PART, norm_eps,
                 ONE_BITS: tl.constexpr, GROUP: tl.constexpr, HAS_COL: tl.constexpr, HAS_OFFSET: tl.constexpr,
                 RANK: tl.constexpr, HAS_BIAS: tl.constexpr, GELU: tl.constexpr, HEAD_DIM: tl.constexpr,
                 HAS_RESIDUAL: tl.constexpr, HAS_GATE: tl.constexpr, EVEN_K: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """x [M, K] bf16/fp16, wt uint8 [ceil(K/8), N] -> out [M, N] in x's dtype. M_BUCKET only keys the autotuner."""
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_q = tl.arange(0, BLOCK_K // 8)
    mask_m = offs_m < M
    mask_n = offs_n < N
    kb = (K + 7) // 8
    x_ptrs = x_ptr + offs_m[:, None] * K + offs_k[None, :]
    w_ptrs = wt_ptr + offs_q[:, None] * N + offs_n[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(x_ptrs, mask=mask_m[:, None], other=0.0)
            v = tl.load(w_ptrs, mask=mask_n[None, :], other=0)
        else:
            a = tl.load(x_ptrs, mask=mask_m[:, None] & (offs_k[None, :] < K - k0), other=0.0)
            v = tl.load(w_ptrs, mask=(offs_q[:, None] < kb - k0 // 8) & mask_n[None, :], other=0)
        if HAS_COL:
            cs = tl.load(cs_ptr + k0 + offs_k, mask=offs_k < K - k0, other=0.0)
            a = (a.to(tl.float32) * cs[None, :]).to(x_ptr.dtype.element_ty)
        if GROUP == 0:
            base = ONE_BITS
        elif GROUP % BLOCK_K == 0:
            base = tl.load(gsb_ptr + (k0 // GROUP) * N + offs_n, mask=mask_n, other=0).to(tl.int32)[None, :]
        else:
            kk = k0 + offs_k
            gs_ptrs = gsb_ptr + (kk // GROUP)[:, None] * N + offs_n[None, :]
            base = tl.load(gs_ptrs, mask=(kk < K)[:, None] & mask_n[None, :], other=0).to(tl.int32)
        bits = _sign_mask15(v, BLOCK_K, BLOCK_N) ^ base
        b = bits.to(tl.int16).to(x_ptr.dtype.element_ty, bitcast=True)
        acc = tl.dot(a, b, acc)
        x_ptrs += BLOCK_K
        w_ptrs += (BLOCK_K // 8) * N
    _epilogue(acc, offs_m, offs_n, M, N, out_ptr, rs_ptr, ro_ptr, xsum_ptr, xv_ptr, ut_ptr, bias_ptr,
              res_ptr, gate_ptr, nw_ptr, RPS, NORM_COLS, NORM_PART, norm_eps, HAS_OFFSET, RANK, HAS_BIAS, GELU,
              HEAD_DIM, HAS_RESIDUAL, HAS_GATE, BLOCK_N)


@triton.jit
def _load_int8_step(q_ptr, wt_ptr, offs_m, offs_n, k0, M, N, K,
                    EVEN_K: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """The int8 activation tile [BM, BK] and {0,1} int8 sign tile [BK, BN] at column k0."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    offs_q = k0 // 8 + tl.arange(0, BLOCK_K // 8)
    mask_m = offs_m < M
    mask_n = offs_n < N
    q_ptrs = q_ptr + offs_m[:, None] * K + offs_k[None, :]
    w_ptrs = wt_ptr + offs_q[:, None] * N + offs_n[None, :]
    if EVEN_K:
        a = tl.load(q_ptrs, mask=mask_m[:, None], other=0)
        v = tl.load(w_ptrs, mask=mask_n[None, :], other=0)
    else:
        a = tl.load(q_ptrs, mask=mask_m[:, None] & (offs_k[None, :] < K), other=0)
        v = tl.load(w_ptrs, mask=(offs_q[:, None] < (K + 7) // 8) & mask_n[None, :], other=0)
    return a, _sign_bits01(v, BLOCK_K, BLOCK_N).to(tl.int8)


@triton.jit
def w1a8_kernel(q_ptr, xs_ptr, qsum_ptr, wt_ptr, out_ptr, rs_ptr, gs_ptr, ro_ptr, xsum_ptr, xv_ptr, ut_ptr, bias_ptr,
                res_ptr, gate_ptr, nw_ptr, M, N, K, M_BUCKET, RPS, NORM_COLS, NORM_PART, norm_eps,
                GROUP: tl.constexpr, HAS_OFFSET: tl.constexpr, RANK: tl.constexpr, HAS_BIAS: tl.constexpr,
                GELU: tl.constexpr, HEAD_DIM: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_GATE: tl.constexpr,
                EVEN_K: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """q int8 [M, K] with per-row scale xs f32 [M] and row sums qsum int32 [M] -> out [M, N]."""
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if GROUP == 0:
        acc_i = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        for k0 in range(0, K, BLOCK_K):
            a, b = _load_int8_step(q_ptr, wt_ptr, offs_m, offs_n, k0, M, N, K, EVEN_K, BLOCK_K, BLOCK_N)
            acc_i = tl.dot(a, b, acc_i, out_dtype=tl.int32)
        qsum = tl.load(qsum_ptr + offs_m, mask=offs_m < M, other=0)
        acc = (2 * acc_i - qsum[:, None]).to(tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for g0 in range(0, K, GROUP):
            acc_i = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
            qsum = tl.zeros((BLOCK_M,), dtype=tl.int32)
            for k0 in range(g0, g0 + GROUP, BLOCK_K):
                a, b = _load_int8_step(q_ptr, wt_ptr, offs_m, offs_n, k0, M, N, K, False, BLOCK_K, BLOCK_N)
                qsum += tl.sum(a.to(tl.int32), axis=1)
                acc_i = tl.dot(a, b, acc_i, out_dtype=tl.int32)
            gs = tl.load(gs_ptr + (g0 // GROUP) * N + offs_n, mask=offs_n < N, other=0.0)
            acc += (2 * acc_i - qsum[:, None]).to(tl.float32) * gs[None, :]
    acc = acc * tl.load(xs_ptr + offs_m, mask=offs_m < M, other=0.0)[:, None]
    _epilogue(acc, offs_m, offs_n, M, N, out_ptr, rs_ptr, ro_ptr, xsum_ptr, xv_ptr, ut_ptr, bias_ptr,
              res_ptr, gate_ptr, nw_ptr, RPS, NORM_COLS, NORM_PART, norm_eps, HAS_OFFSET, RANK, HAS_BIAS, GELU,
              HEAD_DIM, HAS_RESIDUAL, HAS_GATE, BLOCK_N)


@triton.jit
def quantize_rows_kernel(x_ptr, cs_ptr, q_ptr, xs_ptr, qsum_ptr, xsum_ptr, lnw_ptr, lnb_ptr, shift_ptr, scale_ptr,
                         xn_ptr, K, RPS, eps,
                         HAS_COL: tl.constexpr, HAS_XSUM: tl.constexpr, NORM: tl.constexpr, LN_WEIGHT: tl.constexpr,
                         LN_BIAS: tl.constexpr, MODULATE: tl.constexpr, STORE_XN: tl.constexpr, FP8: tl.constexpr,
                         BLOCK: tl.constexpr):
    """One row per program: q = round(x * col_scale / s) in int8 with s = max|x * col_scale| / 127;
    with HAS_XSUM also the row sum of x (the row offset's term), which saves a pass over x. With FP8,
    q = x * col_scale / s rounded to float8 e4m3 (to nearest even) with s = max|x * col_scale| / 448,
    e4m3's largest value, and no row sums of q.

    With NORM, x is first the prologue's output (fusion.py): LayerNorm over K (optional weight and bias
    [K]), then with MODULATE x * (1 + scale) + shift of the row's sample (row // RPS; shift, scale [B, K]).
    The row sum is then of that output, and STORE_XN writes it to xn (in xn's dtype, for the low-rank term)."""
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < K
    x = tl.load(x_ptr + row * K + offs, mask=mask, other=0.0).to(tl.float32)
    if NORM:
        centered = tl.where(mask, x - tl.sum(x, axis=0) / K, 0.0)
        x = centered * tl.rsqrt(tl.sum(centered * centered, axis=0) / K + eps)
        if LN_WEIGHT:
            x = x * tl.load(lnw_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if LN_BIAS:
            x += tl.load(lnb_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if MODULATE:
            sample = row // RPS
            mod_scale = tl.load(scale_ptr + sample * K + offs, mask=mask, other=0.0).to(tl.float32)
            x = x * (1.0 + mod_scale) + tl.load(shift_ptr + sample * K + offs, mask=mask, other=0.0).to(tl.float32)
    if STORE_XN:
        tl.store(xn_ptr + row * K + offs, x.to(xn_ptr.dtype.element_ty), mask=mask)
    if HAS_XSUM:
        tl.store(xsum_ptr + row, tl.sum(x, axis=0))
    if HAS_COL:
        x = x * tl.load(cs_ptr + offs, mask=mask, other=0.0)
    amax = tl.max(tl.abs(x), axis=0)
    if FP8:
        scale = tl.maximum(amax, 1e-30) / 448.0
        q = tl.minimum(tl.maximum(x / scale, -448.0), 448.0)  # x / scale may round past 448
        tl.store(q_ptr + row * K + offs, q.to(tl.float8e4nv), mask=mask)
    else:
        scale = tl.maximum(amax, 1e-30) / 127.0
        q = tl.minimum(tl.maximum(tl.floor(x / scale + 0.5), -127.0), 127.0)
        tl.store(q_ptr + row * K + offs, q.to(tl.int8), mask=mask)
        tl.store(qsum_ptr + row, tl.sum(q, axis=0).to(tl.int32))
    tl.store(xs_ptr + row, scale)
