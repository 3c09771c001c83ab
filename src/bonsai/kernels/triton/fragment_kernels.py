"""Register-operand bitmatmul kernels: the unpacked weight is the tensor cores' A operand.

Each program computes a transposed tile out^T[BLOCK_N, BLOCK_M] = W[BLOCK_N, BLOCK_K] @ x^T[BLOCK_K,
BLOCK_M]. x^T streams through shared memory with the pipelined asynchronous loads; the weight is
expanded from the fragment words of fragments.py straight into the A-operand registers, which
Hopper's wgmma reads from registers. So the unpack needs no shared-memory store and no barrier. It does
not overlap the tensor cores within a program, though: Triton leaves the bf16 wgmma in flight, but ptxas
then serializes it (C7515; benchmarks/triton_sass.py), so the overlap comes from the other program on the
SM (gluon_ws.py splits the work between warps instead). Per pair of bf16 weights the expansion is one
shift and one LOP3 (_signs_onto), per quad of int8 one shift and one AND; the tl.join / tl.permute /
tl.reshape chain only names which register holds which element (compiled, it moves no data: see
benchmarks/triton_sass.py).

- w1a16_frag_kernel: bf16/fp16 x; signs become the bit pattern of +-1 or of +-group_scale.
  Column scales are folded into x by the launcher (x^T goes to shared memory untouched).
- w1a8_frag_kernel: int8 x from quantize_rows_kernel; {0, 1} weights, finished with the row sums
  of q as in kernels.w1a8_kernel. With FP8, x is float8 e4m3 instead (quantize_rows_kernel's FP8) and
  the weights are the e4m3 bytes of +-1, accumulated in float32: Triton leaves a float32-accumulating
  wgmma in flight while the next step unpacks (ptxas too, for fp8), an int32-accumulating one it does not.
  FP8 runs under the interpreter only: Triton 3.6 compiled it wrong on an H200 (ops.ACTIVATIONS).
Both need GROUP == 0 or GROUP % BLOCK_K == 0 (the launcher falls back to kernels.py otherwise).
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

from .kernels import _epilogue
from .schedule import _tile_ids

SIGN_PAIR = tl.constexpr(-2147450880)  # 0x80008000 as int32: the sign bits of two bf16 in one 32-bit register
LOW_BYTES = tl.constexpr(0x01010101)
SIGN_BYTES = tl.constexpr(-2139062144)  # 0x80808080: the sign bits of four 8-bit floats in one int32
E4M3_MINUS_ONES = tl.constexpr(-1195853640)  # 0xB8B8B8B8: four e4m3 -1.0 (0x38 is +1.0)
# Compiled kernels merge the sign mask and the bits they go onto in one LOP3 by inline PTX: ptxas merges the AND
# and the XOR itself only when one of the two is in a register, and as Triton constants both are immediates.
# The interpreter (decided, as here, when the module is imported) runs no PTX and takes the plain expression.
PTX = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") in ("", "0"))


@triton.jit
def _signs_onto(v, base):
    """(v & SIGN_PAIR) ^ base: the sign bits of v's two 16-bit halves onto base's (int32, broadcast to v)."""
    if PTX:  # -2147450880 is SIGN_PAIR; LUT 0x6a is (a & b) ^ c
        return tl.inline_asm_elementwise("lop3.b32 $0, $1, -2147450880, $2, 0x6a;", "=r,r,r", [v, base],
                                         dtype=tl.int32, is_pure=True, pack=1)
    return (v & SIGN_PAIR) ^ base


@triton.jit
def _bf16_pair(w, P: tl.constexpr, base):
    """Pair p of every word -> int16 [..., 2 (e)]: bit p (e=0) and p+16 (e=1) become the sign bits of base."""
    v = _signs_onto(w << (15 - P), base)
    return tl.join(v.to(tl.int16), (v >> 16).to(tl.int16))


@triton.jit
def _bf16_rows(w, RS: tl.constexpr, base):
    """Rows r0 + 8 RS of every lane's word -> int16 [..., e, h, j % 2, j // 2] (pair p = 8 RS + 2 j + h)."""
    j0 = tl.join(_bf16_pair(w, 8 * RS + 0, base), _bf16_pair(w, 8 * RS + 1, base))
    j1 = tl.join(_bf16_pair(w, 8 * RS + 2, base), _bf16_pair(w, 8 * RS + 3, base))
    j2 = tl.join(_bf16_pair(w, 8 * RS + 4, base), _bf16_pair(w, 8 * RS + 5, base))
    j3 = tl.join(_bf16_pair(w, 8 * RS + 6, base), _bf16_pair(w, 8 * RS + 7, base))
    return tl.join(tl.join(j0, j1), tl.join(j2, j3))


@triton.jit
def _bf16_operand(w, base0, base1, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """int32 words [G, KCH, 8 (r0), 4 (c)] -> int16 [BLOCK_N, BLOCK_K] bit patterns (fragments.py order)."""
    t = tl.join(_bf16_rows(w, 0, base0), _bf16_rows(w, 1, base1))  # [g, kch, r0, c, e, h, jl, jh, rs]
    t = tl.permute(t, (0, 8, 2, 1, 7, 6, 5, 3, 4))  # [g, rs, r0, kch, jh, jl, h, c, e]
    return tl.reshape(t, (BLOCK_N, BLOCK_K))


@triton.jit
def _int8_quad(w, Q: tl.constexpr, FP8: tl.constexpr):
    """Bits q, q+8, q+16, q+24 of every word -> int8 [..., i % 2, i // 2] of {0, 1} (FP8: the e4m3
    bytes of -1 with the sign bit cleared where the bit is set, i.e. +-1)."""
    if FP8:
        v = ((w << (7 - Q)) & SIGN_BYTES) ^ E4M3_MINUS_ONES
    else:
        v = (w >> Q) & LOW_BYTES
    lo = tl.join(v.to(tl.int8), (v >> 8).to(tl.int8))
    hi = tl.join((v >> 16).to(tl.int8), (v >> 24).to(tl.int8))
    return tl.join(lo, hi)


@triton.jit
def _int8_word(w, RS: tl.constexpr, FP8: tl.constexpr):
    """One word of every lane, rows r0 + 8 RS -> [..., il, ih, h, t % 2] (q = 4 RS + 2 (t % 2) + h)."""
    t0 = tl.join(_int8_quad(w, 4 * RS + 0, FP8), _int8_quad(w, 4 * RS + 1, FP8))
    t1 = tl.join(_int8_quad(w, 4 * RS + 2, FP8), _int8_quad(w, 4 * RS + 3, FP8))
    return tl.join(t0, t1)


@triton.jit
def _int8_operand(w0, w1, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, FP8: tl.constexpr):
    """Words t // 2 = 0, 1, each [G, KCH, 8 (r0), 4 (c)] -> [BLOCK_N, BLOCK_K]: int8 of {0, 1}, or e4m3 +-1."""
    r0 = tl.join(_int8_word(w0, 0, FP8), _int8_word(w1, 0, FP8))
    r1 = tl.join(_int8_word(w0, 1, FP8), _int8_word(w1, 1, FP8))
    t = tl.join(r0, r1)  # [g, kch, r0, c, il, ih, h, tl, th, rs]
    t = tl.permute(t, (0, 9, 2, 1, 8, 7, 6, 3, 5, 4))  # [g, rs, r0, kch, th, tl, h, c, ih, il]
    t = tl.reshape(t, (BLOCK_N, BLOCK_K))
    if FP8:
        t = t.to(tl.float8e4nv, bitcast=True)
    return t


@triton.jit
def _word_ptrs(w_ptr, pid_n, k0, NG, KC, WORDS: tl.constexpr, CHUNK: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Pointers [G, KCH, WORDS] to the words of this program's rows at column k0, and their mask."""
    G: tl.constexpr = BLOCK_N // 16
    KCH: tl.constexpr = BLOCK_K // CHUNK
    g = pid_n * G + tl.arange(0, G)[:, None, None]
    kc = k0 // CHUNK + tl.arange(0, KCH)[None, :, None]
    lane = tl.arange(0, WORDS)[None, None, :]
    return w_ptr + (g * KC + kc) * WORDS + lane, (g < NG) & (kc < KC)


@triton.jit
def _x_tile(x_ptr, offs_m, k0, M, K, EVEN_K: tl.constexpr, BLOCK_K: tl.constexpr):
    """x^T [BLOCK_K, BLOCK_M] at column k0 (zero past M and K)."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    ptrs = x_ptr + offs_m[None, :] * K + offs_k[:, None]
    if EVEN_K:
        return tl.load(ptrs, mask=(offs_m < M)[None, :], other=0.0)
    return tl.load(ptrs, mask=(offs_m < M)[None, :] & (offs_k < K)[:, None], other=0.0)


@triton.jit
def _row_bases(gsb_ptr, pid_n, k0, N, GROUP: tl.constexpr, BLOCK_N: tl.constexpr):
    """The bit patterns of (+group_scale) for rows r0 and r0 + 8 of every group, twice per int32: [G, 1, 8, 1] each."""
    G: tl.constexpr = BLOCK_N // 16
    rows = pid_n * BLOCK_N + (tl.arange(0, G)[:, None, None] * 16 + tl.arange(0, 8)[None, :, None]
                              + tl.arange(0, 2)[None, None, :] * 8)  # [G, 8 (r0), 2 (rs)]
    bits = tl.load(gsb_ptr + (k0 // GROUP) * N + rows, mask=rows < N, other=0).to(tl.int32) & 0xFFFF
    b0, b1 = tl.split(bits * 0x10001)
    return b0[:, None, :, None], b1[:, None, :, None]


@triton.jit
def w1a16_frag_kernel(x_ptr, w_ptr, out_ptr, part_ptr, count_ptr, rs_ptr, gsb_ptr, ro_ptr, xsum_ptr, xv_ptr, ut_ptr,
                      bias_ptr, res_ptr, gate_ptr, nw_ptr, M, N, K, NG, KC, M_BUCKET, RPS, NORM_COLS, NORM_PART,
                      norm_eps, ONE_BITS: tl.constexpr, GROUP: tl.constexpr, HAS_OFFSET: tl.constexpr,
                      RANK: tl.constexpr, HAS_BIAS: tl.constexpr, GELU: tl.constexpr, HEAD_DIM: tl.constexpr,
                      HAS_RESIDUAL: tl.constexpr, HAS_GATE: tl.constexpr, EVEN_K: tl.constexpr, SPLIT_K: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """x [M, K] bf16/fp16 (column scale applied), w int32 [NG, KC, 32] fragment words -> out [M, N].
    SPLIT_K > 1 (few rows: more programs to stream the weights): program (tile, s) sums its share of the
    K blocks into part [SPLIT_K, M, N] float32, and the tile's last program to finish (count_ptr: one
    zeroed int32 per tile) adds the shares and applies the epilogue."""
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    G: tl.constexpr = BLOCK_N // 16
    KCH: tl.constexpr = BLOCK_K // 64
    k_lo = 0
    k_hi = K
    if SPLIT_K > 1:
        k_share = ((K + BLOCK_K - 1) // BLOCK_K + SPLIT_K - 1) // SPLIT_K * BLOCK_K
        k_lo = tl.program_id(1) * k_share
        k_hi = min(K, k_lo + k_share)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        xt = _x_tile(x_ptr, offs_m, k0, M, K, EVEN_K, BLOCK_K)
        w_ptrs, w_mask = _word_ptrs(w_ptr, pid_n, k0, NG, KC, 32, 64, BLOCK_N, BLOCK_K)
        w = tl.reshape(tl.load(w_ptrs, mask=w_mask, other=0), (G, KCH, 8, 4))
        if GROUP == 0:
            ones = tl.full((1, 1, 1, 1), ONE_BITS * 0x10001, tl.int32)
            a = _bf16_operand(w, ones, ones, BLOCK_N, BLOCK_K)
        else:
            base0, base1 = _row_bases(gsb_ptr, pid_n, k0, N, GROUP, BLOCK_N)
            a = _bf16_operand(w, base0, base1, BLOCK_N, BLOCK_K)
        a = a.to(x_ptr.dtype.element_ty, bitcast=True)
        acc = tl.dot(a, xt, acc)
    last = True
    if SPLIT_K > 1:
        acc, last = _shares_sum(acc, part_ptr, count_ptr, offs_m, offs_n, M, N, SPLIT_K)
    if last:
        _epilogue(tl.trans(acc), offs_m, offs_n, M, N, out_ptr, rs_ptr, ro_ptr, xsum_ptr, xv_ptr, ut_ptr, bias_ptr,
                  res_ptr, gate_ptr, nw_ptr, RPS, NORM_COLS, NORM_PART, norm_eps, HAS_OFFSET, RANK, HAS_BIAS, GELU,
                  HEAD_DIM, HAS_RESIDUAL, HAS_GATE, BLOCK_N)


@triton.jit
def _shares_sum(acc, part_ptr, count_ptr, offs_m, offs_n, M, N, SPLIT_K: tl.constexpr):
    """Writes this program's share acc [BLOCK_N, BLOCK_M] to part [SPLIT_K, M, N] and counts it in the tile's
    counter. The tile's last program to finish gets (the sum of all shares, True), added in a fixed order (the
    same bits every run) and resets the counter; the others get (acc, False)."""
    mask = (offs_n < N)[:, None] & (offs_m < M)[None, :]
    offs = offs_m[None, :] * N + offs_n[:, None]
    tl.store(part_ptr + tl.program_id(1) * M * N + offs, acc, mask=mask)
    # As CUTLASS's split-K semaphore: every thread's stores come before one thread's release of the count,
    # and the last program's acquire comes before its loads (.cg: from L2, where the other programs wrote).
    tl.debug_barrier()
    done = tl.atomic_add(count_ptr + tl.program_id(0), 1, sem="acq_rel", scope="gpu")
    last = done == SPLIT_K - 1
    if last:
        acc = tl.zeros_like(acc)
        for s in tl.static_range(SPLIT_K):
            acc += tl.load(part_ptr + s * M * N + offs, mask=mask, other=0.0, cache_modifier=".cg")
        tl.atomic_xchg(count_ptr + tl.program_id(0), 0, sem="relaxed", scope="gpu")  # zero for the next launch
    return acc, last


@triton.jit
def _int8_step(q_ptr, w_ptr, offs_m, pid_n, k0, M, K, NG, KC, EVEN_K: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, FP8: tl.constexpr):
    """q^T [BLOCK_K, BLOCK_M] and the weight tile [BLOCK_N, BLOCK_K] at column k0: int8 and {0, 1}, or
    (FP8) e4m3 and +-1."""
    G: tl.constexpr = BLOCK_N // 16
    KCH: tl.constexpr = BLOCK_K // 128
    qt = _x_tile(q_ptr, offs_m, k0, M, K, EVEN_K, BLOCK_K)
    w_ptrs, w_mask = _word_ptrs(w_ptr, pid_n, k0, NG, KC, 64, 128, BLOCK_N, BLOCK_K)
    w = tl.reshape(tl.load(w_ptrs, mask=w_mask, other=0), (G, KCH, 8, 4, 2))
    w0, w1 = tl.split(w)
    return qt, _int8_operand(w0, w1, BLOCK_N, BLOCK_K, FP8)


@triton.jit
def w1a8_frag_kernel(q_ptr, xs_ptr, qsum_ptr, w_ptr, out_ptr, rs_ptr, gs_ptr, ro_ptr, xsum_ptr, xv_ptr, ut_ptr,
                     bias_ptr, res_ptr, gate_ptr, nw_ptr, M, N, K, NG, KC, M_BUCKET, RPS, NORM_COLS, NORM_PART,
                     norm_eps, GROUP: tl.constexpr, HAS_OFFSET: tl.constexpr, RANK: tl.constexpr,
                     HAS_BIAS: tl.constexpr, GELU: tl.constexpr, HEAD_DIM: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                     HAS_GATE: tl.constexpr, EVEN_K: tl.constexpr, FP8: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """q int8 [M, K] (scale xs, row sums qsum), w int32 [NG, KC, 64] fragment words -> out [M, N].
    FP8: q is float8 e4m3 and qsum is not read."""
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if FP8:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        if GROUP == 0:
            for k0 in range(0, K, BLOCK_K):
                qt, b = _int8_step(q_ptr, w_ptr, offs_m, pid_n, k0, M, K, NG, KC, EVEN_K, BLOCK_N, BLOCK_K, True)
                acc = tl.dot(b, qt, acc)
        else:
            for g0 in range(0, K, GROUP):
                acc_g = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
                for k0 in range(g0, g0 + GROUP, BLOCK_K):
                    qt, b = _int8_step(q_ptr, w_ptr, offs_m, pid_n, k0, M, K, NG, KC, False, BLOCK_N, BLOCK_K, True)
                    acc_g = tl.dot(b, qt, acc_g)
                gs = tl.load(gs_ptr + (g0 // GROUP) * N + offs_n, mask=offs_n < N, other=0.0)
                acc += acc_g * gs[:, None]
    elif GROUP == 0:
        acc_i = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.int32)
        for k0 in range(0, K, BLOCK_K):
            qt, b = _int8_step(q_ptr, w_ptr, offs_m, pid_n, k0, M, K, NG, KC, EVEN_K, BLOCK_N, BLOCK_K, False)
            acc_i = tl.dot(b, qt, acc_i, out_dtype=tl.int32)
        qsum = tl.load(qsum_ptr + offs_m, mask=offs_m < M, other=0)
        acc = (2 * acc_i - qsum[None, :]).to(tl.float32)
    else:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        for g0 in range(0, K, GROUP):
            acc_i = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.int32)
            qsum = tl.zeros((BLOCK_M,), dtype=tl.int32)
            for k0 in range(g0, g0 + GROUP, BLOCK_K):
                qt, b = _int8_step(q_ptr, w_ptr, offs_m, pid_n, k0, M, K, NG, KC, False, BLOCK_N, BLOCK_K, False)
                qsum += tl.sum(qt.to(tl.int32), axis=0)
                acc_i = tl.dot(b, qt, acc_i, out_dtype=tl.int32)
            gs = tl.load(gs_ptr + (g0 // GROUP) * N + offs_n, mask=offs_n < N, other=0.0)
            acc += (2 * acc_i - qsum[None, :]).to(tl.float32) * gs[:, None]
    acc = acc * tl.load(xs_ptr + offs_m, mask=offs_m < M, other=0.0)[None, :]
    _epilogue(tl.trans(acc), offs_m, offs_n, M, N, out_ptr, rs_ptr, ro_ptr, xsum_ptr, xv_ptr, ut_ptr, bias_ptr,
              res_ptr, gate_ptr, nw_ptr, RPS, NORM_COLS, NORM_PART, norm_eps, HAS_OFFSET, RANK, HAS_BIAS, GELU,
              HEAD_DIM, HAS_RESIDUAL, HAS_GATE, BLOCK_N)
