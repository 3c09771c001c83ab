// Row-wise operations fused into a bitmm call (struct Fusion in bitmm.h; bonsai/kernels/fusion.py
// is the reference): the prologue normalizes and modulates each activation row before it is
// quantized, the epilogue applies tanh-GELU, per-head RMSNorm and a gated residual to each output
// row (GELU and residual on each output tile while it is in L1, head norms on finished rows).
// Doing them in the kernel saves the framework's separate passes over the tensors (and their
// temporaries); torch's tanh-GELU alone costs more than a bonsai-emoji fc1 product on 2 cores.
//
// One source for every path: the bodies below are plain loops without library calls (exp is a
// polynomial, reductions are `omp simd`), inlined into a baseline function and into AVX2 and
// AVX-512 target functions, where the compiler vectorizes them for that width. One exception:
// AVX-512 GELU is written out, to replace its division by a refined reciprocal (vdivps alone
// would take most of its time).
#include <math.h>

#include <initializer_list>

#include "bitmm.h"

#ifdef BONSAI_X86
#include <immintrin.h>
#endif

namespace bonsai {
namespace {

#define ROW_INLINE static inline __attribute__((always_inline))

// exp(t) for t in [-87, 87]: 2^n * P(r), r = t - n ln 2 in [-ln2/2, ln2/2], P of degree 6
// (relative error ~2e-7, like expf).
ROW_INLINE float exp_poly(float t) {
  const float n = rintf(t * 1.44269504f);
  const float r = (t - n * 0.693145752f) - n * 1.42860677e-6f;
  float e = 1.f / 720;
  e = e * r + 1.f / 120;
  e = e * r + 1.f / 24;
  e = e * r + 1.f / 6;
  e = e * r + 0.5f;
  e = e * r + 1.f;
  e = e * r + 1.f;
  const int32_t bits = ((int32_t)n + 127) << 23;
  float scale;
  memcpy(&scale, &bits, 4);
  return e * scale;
}

// 0.5 y (1 + tanh(u)) = y / (1 + exp(-2u)), u = sqrt(2 / pi) (y + 0.044715 y^3).
ROW_INLINE float gelu_tanh(float y) {
  float t = -1.59576912f * (y + 0.044715f * y * y * y);
  t = t > 87.f ? 87.f : (t < -87.f ? -87.f : t);
  return y / (1.f + exp_poly(t));
}

ROW_INLINE void prologue_row_body(const Problem& p, int64_t m, const float* x, float* out) {
  const Fusion& f = *p.fusion;
  const int64_t K = p.K, b = m / f.rows_per_sample;
  float sum = 0.f, sq = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t k = 0; k < K; ++k) sum += x[k];
  const float mean = sum / (float)K;
#pragma omp simd reduction(+ : sq)
  for (int64_t k = 0; k < K; ++k) sq += (x[k] - mean) * (x[k] - mean);
  const float rstd = 1.f / sqrtf(sq / (float)K + f.ln_eps);
  for (int64_t k = 0; k < K; ++k) out[k] = (x[k] - mean) * rstd;
  if (f.ln_weight)
    for (int64_t k = 0; k < K; ++k) out[k] *= f.ln_weight[k];
  if (f.ln_bias)
    for (int64_t k = 0; k < K; ++k) out[k] += f.ln_bias[k];
  if (f.shift) {
    const float *shift = f.shift + b * K, *scale = f.scale + b * K;
    for (int64_t k = 0; k < K; ++k) out[k] = out[k] * (1.f + scale[k]) + shift[k];
  }
}

// The low-rank residual's first factor of one row: t[j] = V[j] . x, zero past the rank.
ROW_INLINE void lowrank_row_body(const Problem& p, const float* x, float* t) {
  for (int64_t j = 0; j < p.rank_pad; ++j) {
    float s = 0.f;
    const float* v = p.lowrank_v + (j < p.rank ? j : 0) * p.K;
#pragma omp simd reduction(+ : s)
    for (int64_t k = 0; k < p.K; ++k) s += x[k] * v[k];
    t[j] = j < p.rank ? s : 0.f;
  }
}

// A finished tile's output (Ops::write_tile). The low-rank term goes 16 ranks at a time through u:
// U's bfloat16 for the tile's columns, unpacked once per tile, so that the sums over columns
// vectorize (unpacked per element and row it took 13x the 1-bit product on bonsai-emoji's layers).
ROW_INLINE void write_tile_body(const Problem& p, const ActPanel& a, Tile tile, int ncols, float* y, int64_t ldy) {
  const float* f = tile.f;
  const int64_t n0 = tile.n0;
  for (int r = 0; r < a.mr; ++r) {
    float* yr = y + r * ldy;
    for (int c = 0; c < ncols; ++c) yr[c] = a.scale[r] * f[r * PANEL + c];
    if (p.row_offset)
      for (int c = 0; c < ncols; ++c) yr[c] += p.row_offset[n0 + c] * a.xsum[r];
    if (p.bias)
      for (int c = 0; c < ncols; ++c) yr[c] += p.bias[n0 + c];
  }
  float u[16][PANEL];
  for (int64_t j0 = 0; j0 < p.rank; j0 += 16) {
    // lowrank_ub holds pairs of ranks for 16 columns, [16][2], zero past N and past the rank (as lrt
    // is): all 32 columns and 16 ranks are unpacked, and the loop below has constant trip counts
    for (int h = 0; h < 2; ++h)
      for (int jj = 0; jj < 16; jj += 2) {
        const uint16_t* pair = lowrank_pairs(p, n0 + 16 * h, j0 + jj);
        for (int c = 0; c < 16; ++c) {
          const uint32_t even = (uint32_t)pair[2 * c] << 16, odd = (uint32_t)pair[2 * c + 1] << 16;
          memcpy(&u[jj][16 * h + c], &even, 4);
          memcpy(&u[jj + 1][16 * h + c], &odd, 4);
        }
      }
    for (int r = 0; r < a.mr; ++r) {
      float* yr = y + r * ldy;
      const float* t = a.lrt + r * p.rank_pad + j0;
      float s[PANEL];
      for (int c = 0; c < PANEL; ++c) s[c] = 0.f;
      for (int jj = 0; jj < 16; ++jj)
        for (int c = 0; c < PANEL; ++c) s[c] += t[jj] * u[jj][c];
      for (int c = 0; c < ncols; ++c) yr[c] += s[c];
    }
  }
}

// Residual + gate * y on columns n0 .. n0 + ncols - 1 of row m (y points at column n0).
ROW_INLINE void add_residual(const Fusion& f, int64_t N, int64_t m, int64_t n0, int ncols, float* y) {
  const float* res = f.residual + m * N + n0;
  if (f.gate) {
    const float* gate = f.gate + m / f.rows_per_sample * N + n0;
    for (int c = 0; c < ncols; ++c) y[c] = res[c] + gate[c] * y[c];
  } else {
    for (int c = 0; c < ncols; ++c) y[c] = res[c] + y[c];
  }
}

ROW_INLINE void gelu_loop(float* y, int n) {
  for (int c = 0; c < n; ++c) y[c] = gelu_tanh(y[c]);
}

#ifdef BONSAI_X86
// gelu_tanh on 16 lanes: the same exp polynomial (vscalefps applies 2^n), and 1 / (1 + e) as rcp14
// plus one Newton step (relative error ~1e-7).
TARGET_AVX512 void gelu_avx512(float* y, int n) {
  const __m512 one = _mm512_set1_ps(1.f), two = _mm512_set1_ps(2.f);
  for (int c = 0; c < n; c += 16) {
    const __mmask16 m = n - c >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - c)) - 1);
    const __m512 v = _mm512_maskz_loadu_ps(m, y + c);
    const __m512 cube = _mm512_mul_ps(_mm512_mul_ps(v, v), _mm512_mul_ps(v, _mm512_set1_ps(0.044715f)));
    __m512 t = _mm512_mul_ps(_mm512_set1_ps(-1.59576912f), _mm512_add_ps(v, cube));
    t = _mm512_min_ps(_mm512_max_ps(t, _mm512_set1_ps(-87.f)), _mm512_set1_ps(87.f));
    const __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(t, _mm512_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT);
    __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693145752f), t);
    r = _mm512_fnmadd_ps(k, _mm512_set1_ps(1.42860677e-6f), r);
    __m512 e = _mm512_set1_ps(1.f / 720);
    for (const float coef : {1.f / 120, 1.f / 24, 1.f / 6, 0.5f, 1.f, 1.f}) e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(coef));
    const __m512 d = _mm512_add_ps(one, _mm512_scalef_ps(e, k));
    const __m512 r0 = _mm512_rcp14_ps(d);
    _mm512_mask_storeu_ps(y + c, m, _mm512_mul_ps(v, _mm512_mul_ps(r0, _mm512_fnmadd_ps(d, r0, two))));
  }
}

// The same on 8 lanes for AVX2, 2^n applied through the exponent bits.
TARGET_AVX2 void gelu_avx2(float* y, int n) {
  const __m256 one = _mm256_set1_ps(1.f), two = _mm256_set1_ps(2.f);
  for (int c = 0; c < n; c += 8) {
    const __m256i m = _mm256_cmpgt_epi32(_mm256_set1_epi32(n - c), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    const __m256 v = _mm256_maskload_ps(y + c, m);
    const __m256 cube = _mm256_mul_ps(_mm256_mul_ps(v, v), _mm256_mul_ps(v, _mm256_set1_ps(0.044715f)));
    __m256 t = _mm256_mul_ps(_mm256_set1_ps(-1.59576912f), _mm256_add_ps(v, cube));
    t = _mm256_min_ps(_mm256_max_ps(t, _mm256_set1_ps(-87.f)), _mm256_set1_ps(87.f));
    const __m256 k = _mm256_round_ps(_mm256_mul_ps(t, _mm256_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(k, _mm256_set1_ps(0.693145752f), t);
    r = _mm256_fnmadd_ps(k, _mm256_set1_ps(1.42860677e-6f), r);
    __m256 e = _mm256_set1_ps(1.f / 720);
    for (const float coef : {1.f / 120, 1.f / 24, 1.f / 6, 0.5f, 1.f, 1.f}) e = _mm256_fmadd_ps(e, r, _mm256_set1_ps(coef));
    const __m256 scale = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)), 23));
    const __m256 d = _mm256_fmadd_ps(e, scale, one);
    const __m256 r0 = _mm256_rcp_ps(d);
    _mm256_maskstore_ps(y + c, m, _mm256_mul_ps(v, _mm256_mul_ps(r0, _mm256_fnmadd_ps(d, r0, two))));
  }
}
#endif

template <void (*Gelu)(float*, int)>
ROW_INLINE void epilogue_tile_body(const Problem& p, int64_t m0, int rows, int64_t n0, int ncols, float* y,
                                   int64_t ldy) {
  const Fusion& f = *p.fusion;
  for (int r = 0; r < rows; ++r) {
    if (f.gelu) Gelu(y + r * ldy, ncols);
    if (f.residual && !f.norm_cols) add_residual(f, p.N, m0 + r, n0, ncols, y + r * ldy);
  }
}

ROW_INLINE void epilogue_norms_body(const Problem& p, int64_t m, float* y) {
  const Fusion& f = *p.fusion;
  for (int64_t h = 0; h < f.norm_cols; h += f.norm_dim) {
    float* yh = y + h;
    const float* w = f.norm_weight + h / (f.norm_cols / f.norm_groups) * f.norm_dim;
    float sq = 0.f;
#pragma omp simd reduction(+ : sq)
    for (int64_t c = 0; c < f.norm_dim; ++c) sq += yh[c] * yh[c];
    const float r = 1.f / sqrtf(sq / (float)f.norm_dim + f.norm_eps);
    for (int64_t c = 0; c < f.norm_dim; ++c) yh[c] = yh[c] * r * w[c];
  }
  if (f.residual) add_residual(f, p.N, m, 0, (int)p.N, y);
}

}  // namespace

void prologue_row_scalar(const Problem& p, int64_t m, const float* x, float* out) { prologue_row_body(p, m, x, out); }
void lowrank_row_scalar(const Problem& p, const float* x, float* t) { lowrank_row_body(p, x, t); }
void write_tile_scalar(const Problem& p, const ActPanel& a, Tile t, int ncols, float* y, int64_t ldy) {
  write_tile_body(p, a, t, ncols, y, ldy);
}
void epilogue_tile_scalar(const Problem& p, int64_t m0, int rows, int64_t n0, int ncols, float* y, int64_t ldy) {
  epilogue_tile_body<gelu_loop>(p, m0, rows, n0, ncols, y, ldy);
}
void epilogue_norms_scalar(const Problem& p, int64_t m, float* y) { epilogue_norms_body(p, m, y); }

#ifdef BONSAI_X86
namespace x86 {
TARGET_AVX2 void prologue_row_avx2(const Problem& p, int64_t m, const float* x, float* out) {
  prologue_row_body(p, m, x, out);
}

TARGET_AVX2 void epilogue_tile_avx2(const Problem& p, int64_t m0, int rows, int64_t n0, int ncols, float* y,
                                    int64_t ldy) {
  epilogue_tile_body<gelu_avx2>(p, m0, rows, n0, ncols, y, ldy);
}
TARGET_AVX2 void epilogue_norms_avx2(const Problem& p, int64_t m, float* y) { epilogue_norms_body(p, m, y); }
TARGET_AVX512 void prologue_row_avx512(const Problem& p, int64_t m, const float* x, float* out) {
  prologue_row_body(p, m, x, out);
}
TARGET_AVX512 void epilogue_tile_avx512(const Problem& p, int64_t m0, int rows, int64_t n0, int ncols, float* y,
                                        int64_t ldy) {
  epilogue_tile_body<gelu_avx512>(p, m0, rows, n0, ncols, y, ldy);
}
TARGET_AVX512 void epilogue_norms_avx512(const Problem& p, int64_t m, float* y) { epilogue_norms_body(p, m, y); }
}  // namespace x86
#endif

}  // namespace bonsai
