// CPU 1-bit matmul: y[M, N] = x[M, K] @ W.T, W = row_scale * group_scale * col_scale * B + row_offset
// (the low-rank term is added by the Python binding).
//
// Approach, chosen after measuring on a 2-core Xeon (AVX-512 + VNNI; torch fp32 110-160 GFLOP/s):
//  * Activations are quantized per token to int8 (absmax / 127, round half to even); col_scale is
//    folded into x first. Signs become bytes w in {0, 2}: since +-1 = w - 1,
//        sum_k (+-1) q_k = sum_k w_k q_k - sum_k q_k,
//    so the inner product is an unsigned-by-signed int8 dot product plus a per-row correction.
//    That maps onto one instruction per 64 multiply-adds with AVX-512 VNNI (vpdpbusd, measured
//    ~700 GOP/s per core peak vs ~210 GFLOP/s for fp32 FMA) and onto vpmaddubsw + vpaddw with AVX2.
//    We chose this over T-MAC style lookup tables: with int8 tables the 4-column partial sums lose
//    precision (or need two shuffles for int16 tables), and the table build is per activation
//    tile; the dot-product form keeps exact integer sums and is simpler, and on this CPU it is
//    already compute-light enough that expansion and quantization are a small share of the time.
//  * Weights are read in the stored layout (no repacked copy, so weight memory stays at 1 bit):
//    each 32-row panel is expanded on the fly into bytes wbuf[k4][32][4] (the vpdpbusd lane layout:
//    32-bit lane = one output column, 4 consecutive k) by mask-to-byte moves plus a dword transpose.
//    The expansion is done once per panel and M-block and is amortized over the block's rows.
//  * Groups: K is cut into groups (each zero-padded to 4 columns); integer sums are flushed to
//    float once per group with the group scale, so any group size works.
//  * Blocking: activation rows in blocks of ~BLOCK_BYTES (stay in L2), 32-column weight panels in
//    L2/L1, register tiles of mr rows x 32 columns. OpenMP splits (M-block, panel) work items.
//  * Paths: scalar (portable, reference for the others), AVX2+FMA, AVX-512 BW+VNNI (x86, chosen at
//    run time from CPU features), NEON (aarch64 only). Every path quantizes identically.
#include "bitmm.h"

#include <math.h>
#include <stdlib.h>

#include <initializer_list>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace bonsai {
namespace {

constexpr int64_t BLOCK_BYTES = 1 << 20;  // quantized activation rows per M-block (L2-sized)
constexpr int64_t KC_STEPS = 128;         // k4 steps per K-chunk: 16 KiB of expanded weights (L1)

void quantize_row_scalar(const Problem& p, const float* x, int8_t* q, float* scale, float* xsum) {
  float amax = 0.f, sum = 0.f;
  for (int64_t k = 0; k < p.K; ++k) {
    sum += x[k];
    const float v = p.col_scale ? x[k] * p.col_scale[k] : x[k];
    if (fabsf(v) > amax) amax = fabsf(v);
  }
  const float inv = amax > 0.f ? 127.f / amax : 0.f;
  *scale = amax / 127.f;
  *xsum = sum;
  for (int64_t k = 0; k < p.K; ++k) {
    const float v = p.col_scale ? x[k] * p.col_scale[k] : x[k];
    float r = rintf(v * inv);
    r = r > 127.f ? 127.f : (r < -127.f ? -127.f : r);
    q[k] = (int8_t)r;
  }
}

void expand_panel_scalar(const Problem& p, int64_t n0, uint8_t* w) {
  for_each_chunk(p, 64, [&](int64_t kp, int64_t k, int nb, int nvalid) {
    for (int i = 0; i < PANEL; ++i) {
      const uint64_t bits = row_bits(p, n0 + i, k, nvalid);
      for (int b = 0; b < nb; ++b)
        w[((kp + b) >> 2) * PANEL_BYTES + i * 4 + ((kp + b) & 3)] = (uint8_t)(((bits >> b) & 1) * 2);
    }
  });
}

void kernel_scalar(const Problem& p, const ActPanel& a, const uint8_t* w, const float* gs, const float* ro,
                   Tile t, int64_t j0, int64_t j1, float* y, int ncols) {
  const int64_t g4 = p.gpad / 4;
  for (int r = 0; r < a.mr; ++r) {
    for (int c = 0; c < ncols; ++c) {
      int32_t acc = j0 % g4 ? t.acc[r * PANEL + c] : 0;
      float& f = t.f[r * PANEL + c];
      for (int64_t j = j0; j < j1; ++j) {
        const uint8_t* wj = w + j * PANEL_BYTES + c * 4;
        const int8_t* qj = a.q + (j * a.mr + r) * 4;
        acc += wj[0] * qj[0] + wj[1] * qj[1] + wj[2] * qj[2] + wj[3] * qj[3];
        if ((j + 1) % g4 == 0) {
          const int64_t g = j / g4;
          f += gs[g * PANEL + c] * (float)(acc - a.sumx[g * a.mr + r]);
          acc = 0;
        }
      }
      t.acc[r * PANEL + c] = acc;
      if (y) y[r * p.N + c] = a.scale[r] * f + ro[c] * a.xsum[r];
    }
  }
}

const Ops SCALAR_OPS = {4, quantize_row_scalar, expand_panel_scalar, kernel_scalar};

float half_to_float(uint16_t h) {
  const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
  if (exp == 0) {
    const float f = ldexpf((float)man, -24);  // zero or subnormal
    return sign ? -f : f;
  }
  const uint32_t bits = sign | (exp == 31 ? 0x7f800000u | (man << 13) : ((exp + 112) << 23) | (man << 13));
  float f;
  memcpy(&f, &bits, 4);
  return f;
}

const Ops* ops_for(int isa) {
  switch (isa) {
    case ISA_SCALAR: return scalar_ops();
    case ISA_AVX2: return x86_has(ISA_AVX2) ? avx2_ops() : nullptr;
    case ISA_AVX512: return x86_has(ISA_AVX512) ? avx512_ops() : nullptr;
    case ISA_NEON: return neon_ops();  // NEON is part of every AArch64 CPU
    default: return nullptr;
  }
}

// Quantize row m and place it in its panel: q[k4][mr][4] with group padding, plus group sums.
void place_row(const Problem& p, const Ops& ops, int64_t m, int8_t* qall, int32_t* sumx_all,
               float* scale, float* xsum, int8_t* qrow, int8_t* padded) {
  const int MR = ops.mr;
  const int64_t mp = m / MR;
  const int r = (int)(m % MR);
  const int mr = (int)(p.M - mp * MR < MR ? p.M - mp * MR : MR);
  ops.quantize_row(p, p.x + m * p.K, qrow, &scale[m], &xsum[m]);
  int32_t* sumx = sumx_all + mp * MR * p.ngroups;
  for (int64_t g = 0; g < p.ngroups; ++g) {
    const int64_t start = g * p.gsize, len = p.K - start < p.gsize ? p.K - start : p.gsize;
    int32_t s = 0;
    for (int64_t c = 0; c < len; ++c) s += qrow[start + c];
    memcpy(padded + g * p.gpad, qrow + start, (size_t)len);
    memset(padded + g * p.gpad + len, 0, (size_t)(p.gpad - len));
    sumx[g * mr + r] = s;
  }
  int8_t* base = qall + mp * MR * p.kpad + r * 4;
  for (int64_t j = 0; j < p.kpad / 4; ++j) memcpy(base + j * mr * 4, padded + j * 4, 4);
}

void* aligned(size_t bytes) {
#ifdef _WIN32
  return _aligned_malloc(bytes, 64);
#else
  return aligned_alloc(64, (bytes + 63) / 64 * 64);
#endif
}

void release(void* p) {
#ifdef _WIN32
  _aligned_free(p);
#else
  free(p);
#endif
}

}  // namespace

const Ops* scalar_ops() { return &SCALAR_OPS; }

}  // namespace bonsai

using namespace bonsai;

#ifdef _WIN32
#define BONSAI_API __declspec(dllexport)
#else
#define BONSAI_API __attribute__((visibility("default")))
#endif

extern "C" {

BONSAI_API int bonsai_bitmm_has_isa(int isa) { return ops_for(isa) != nullptr; }

BONSAI_API int bonsai_bitmm_best_isa(void) {
  for (int isa : {ISA_AVX512, ISA_AVX2, ISA_NEON})
    if (ops_for(isa)) return isa;
  return ISA_SCALAR;
}

// Returns 0 on success, 1 if `isa` cannot run here, 2 if out of memory, 3 on bad sizes.
BONSAI_API int bonsai_bitmm(int isa, int nthreads, const float* x, int64_t M, int64_t K, const uint8_t* signs,
                 int64_t N, const float* row_scale, int64_t group_size, const uint16_t* group_scale,
                 const float* col_scale, const float* row_offset, float* y) {
  if (M < 0 || K <= 0 || N < 0 || group_size < 0 || (group_size > 0) != (group_scale != nullptr)) return 3;
  const Ops* ops = ops_for(isa);
  if (!ops) return 1;
  Problem p = {x, M, K, N, signs, (K + 7) / 8, row_scale, group_scale, col_scale, row_offset, y, 0, 0, 0, 0};
  p.gsize = group_size > 0 && group_size < K ? group_size : K;
  p.gpad = (p.gsize + 3) / 4 * 4;
  p.ngroups = (K + p.gsize - 1) / p.gsize;
  p.kpad = p.ngroups * p.gpad;
  if (M == 0 || N == 0) return 0;
#ifdef _OPENMP
  const int nt = nthreads > 0 ? nthreads : 1;
#else
  const int nt = 1;
  (void)nthreads;
#endif
  const int MR = ops->mr;
  const int64_t npm = (M + MR - 1) / MR, npn = (N + PANEL - 1) / PANEL;
  int64_t mc = BLOCK_BYTES / (MR * p.kpad);  // activation panels per M-block
  mc = mc < 1 ? 1 : (mc > npm ? npm : mc);
  const int64_t nbm = (npm + mc - 1) / mc;
  const int64_t k4 = p.kpad / 4;
  const size_t row_tmp = (size_t)(p.K + p.kpad + 64), wbytes = (size_t)(k4 * PANEL_BYTES);
  const size_t gsn = (size_t)(p.ngroups * PANEL + PANEL), tile_n = (size_t)(mc * MR * PANEL);

  int8_t* q = (int8_t*)aligned((size_t)(npm * MR * p.kpad));
  int32_t* sumx = (int32_t*)aligned(sizeof(int32_t) * (size_t)(npm * MR * p.ngroups));
  float* scale = (float*)aligned(sizeof(float) * (size_t)M * 2);
  int8_t* rows = (int8_t*)aligned(row_tmp * nt);
  uint8_t* wall = (uint8_t*)aligned(wbytes * nt);
  float* gsall = (float*)aligned(sizeof(float) * gsn * nt);
  int32_t* accall = (int32_t*)aligned(sizeof(int32_t) * tile_n * nt);
  float* fall = (float*)aligned(sizeof(float) * tile_n * nt);
  int status = 0;
  if (!q || !sumx || !scale || !rows || !wall || !gsall || !accall || !fall) status = 2;
  float* xsum = scale + M;

  if (status == 0) {
#pragma omp parallel num_threads(nt)
    {
#ifdef _OPENMP
      const int t = omp_get_thread_num();
#else
      const int t = 0;
#endif
      int8_t* qrow = rows + row_tmp * t;
#pragma omp for schedule(static)
      for (int64_t m = 0; m < M; ++m) place_row(p, *ops, m, q, sumx, scale, xsum, qrow, qrow + p.K);

      uint8_t* w = wall + wbytes * t;
      float* gs = gsall + gsn * t;
      float* ro = gs + p.ngroups * PANEL;
      int32_t* acc = accall + tile_n * t;
      float* f = fall + tile_n * t;
      // Dynamic: the two hardware threads may share a core with other work; balance at run time.
#pragma omp for schedule(dynamic)
      for (int64_t it = 0; it < nbm * npn; ++it) {
        const int64_t bm = it / npn, n0 = (it % npn) * PANEL;
        const int ncols = (int)(N - n0 < PANEL ? N - n0 : PANEL);
        ops->expand_panel(p, n0, w);
        for (int c = 0; c < PANEL; ++c) {
          const int64_t n = n0 + c;
          ro[c] = c < ncols && row_offset ? row_offset[n] : 0.f;
          for (int64_t g = 0; g < p.ngroups; ++g) {
            const float gscale = group_scale && c < ncols ? half_to_float(group_scale[n * p.ngroups + g]) : 1.f;
            gs[g * PANEL + c] = c < ncols ? row_scale[n] * gscale : 0.f;
          }
        }
        const int64_t mp0 = bm * mc, mp1 = (bm + 1) * mc < npm ? (bm + 1) * mc : npm;
        memset(f, 0, sizeof(float) * (size_t)((mp1 - mp0) * MR * PANEL));
        // K-chunks outside, activation panels inside: the weight chunk stays in L1.
        for (int64_t j0 = 0; j0 < k4; j0 += KC_STEPS) {
          const int64_t j1 = j0 + KC_STEPS < k4 ? j0 + KC_STEPS : k4;
          for (int64_t mp = mp0; mp < mp1; ++mp) {
            const int64_t m0 = mp * MR;
            const ActPanel a = {q + m0 * p.kpad, sumx + m0 * p.ngroups, scale + m0, xsum + m0,
                                (int)(M - m0 < MR ? M - m0 : MR)};
            const Tile tile = {acc + (mp - mp0) * MR * PANEL, f + (mp - mp0) * MR * PANEL};
            ops->kernel(p, a, w, gs, ro, tile, j0, j1, j1 == k4 ? y + m0 * N + n0 : nullptr, ncols);
          }
        }
      }
    }
  }
  for (void* buf : {(void*)q, (void*)sumx, (void*)scale, (void*)rows, (void*)wall, (void*)gsall, (void*)accall,
                    (void*)fall})
    release(buf);
  return status;
}

}  // extern "C"
