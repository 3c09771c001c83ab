// Row-wise operations fused into a bitmm call (struct Fusion in bitmm.h; bonsai/kernels/fusion.py
// is the reference): the prologue normalizes and modulates each activation row before it is
// quantized, the epilogue applies tanh-GELU, per-head RMSNorm and a gated residual to each output
// row (GELU and residual on each output tile while it is in L1, head norms on finished rows). Doing them in the kernel saves the framework's separate passes over the tensors (and their
// temporaries); torch's tanh-GELU alone costs more than a bonsai-emoji fc1 product on 2 cores.
//
// One source for every path: the bodies below are plain loops without library calls (exp is a
// polynomial, reductions are `omp simd`), inlined into a baseline function and into AVX2 and
// AVX-512 target functions, where the compiler vectorizes them for that width.
#include <math.h>

#include "bitmm.h"

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

ROW_INLINE void epilogue_cols_body(const Problem& p, int64_t m, int64_t n0, int ncols, float* y) {
  const Fusion& f = *p.fusion;
  if (f.gelu)
    for (int c = 0; c < ncols; ++c) y[c] = gelu_tanh(y[c]);
  if (f.residual && !f.norm_cols) add_residual(f, p.N, m, n0, ncols, y);
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
void epilogue_cols_scalar(const Problem& p, int64_t m, int64_t n0, int ncols, float* y) {
  epilogue_cols_body(p, m, n0, ncols, y);
}
void epilogue_norms_scalar(const Problem& p, int64_t m, float* y) { epilogue_norms_body(p, m, y); }

#ifdef BONSAI_X86
namespace x86 {
TARGET_AVX2 void prologue_row_avx2(const Problem& p, int64_t m, const float* x, float* out) {
  prologue_row_body(p, m, x, out);
}
TARGET_AVX2 void epilogue_cols_avx2(const Problem& p, int64_t m, int64_t n0, int ncols, float* y) {
  epilogue_cols_body(p, m, n0, ncols, y);
}
TARGET_AVX2 void epilogue_norms_avx2(const Problem& p, int64_t m, float* y) { epilogue_norms_body(p, m, y); }
TARGET_AVX512 void prologue_row_avx512(const Problem& p, int64_t m, const float* x, float* out) {
  prologue_row_body(p, m, x, out);
}
TARGET_AVX512 void epilogue_cols_avx512(const Problem& p, int64_t m, int64_t n0, int ncols, float* y) {
  epilogue_cols_body(p, m, n0, ncols, y);
}
TARGET_AVX512 void epilogue_norms_avx512(const Problem& p, int64_t m, float* y) { epilogue_norms_body(p, m, y); }
}  // namespace x86
#endif

}  // namespace bonsai
