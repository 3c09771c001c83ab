// AArch64 NEON path of the CPU 1-bit matmul (Apple Silicon, ARM servers). Baseline NEON only:
// int8 x int8 widening multiplies (vmull_s8) with pairwise accumulation (vpadalq_s16); quantization
// and panel expansion reuse the scalar versions. The scalar kernel in bitmm.cpp is its reference.
#include "bitmm.h"

#if defined(__aarch64__)
#include <arm_neon.h>

namespace bonsai {
namespace {

constexpr int NEON_MR = 4;

// MR rows x 8 columns (a quarter of a panel); float tile in memory.
template <int MR>
void kernel_neon_quarter(const Problem& p, const ActPanel& a, const uint8_t* w, const float* gs,
                         const float* ro, float* y, int ncols, int qtr) {
  float tile[MR][8] = {};
  const int64_t g4 = p.gpad / 4;
  for (int64_t g = 0; g < p.ngroups; ++g) {
    int32x4_t acc[MR][4];  // [2v + h]: columns 4v + 2h, 4v + 2h + 1, two k pairs each
    for (int r = 0; r < MR; ++r)
      for (int i = 0; i < 4; ++i) acc[r][i] = vdupq_n_s32(0);
    for (int64_t j = g * g4; j < (g + 1) * g4; ++j) {
      const int8x16_t w0 = vld1q_s8((const int8_t*)(w + j * PANEL_BYTES + qtr * 32));
      const int8x16_t w1 = vld1q_s8((const int8_t*)(w + j * PANEL_BYTES + qtr * 32 + 16));
      for (int r = 0; r < MR; ++r) {
        const int8x8_t xb = vreinterpret_s8_s32(vld1_dup_s32((const int32_t*)(a.q + (j * MR + r) * 4)));
        acc[r][0] = vpadalq_s16(acc[r][0], vmull_s8(vget_low_s8(w0), xb));
        acc[r][1] = vpadalq_s16(acc[r][1], vmull_s8(vget_high_s8(w0), xb));
        acc[r][2] = vpadalq_s16(acc[r][2], vmull_s8(vget_low_s8(w1), xb));
        acc[r][3] = vpadalq_s16(acc[r][3], vmull_s8(vget_high_s8(w1), xb));
      }
    }
    for (int r = 0; r < MR; ++r) {
      const int32x4_t corr = vdupq_n_s32(a.sumx[g * MR + r]);
      for (int v = 0; v < 2; ++v) {
        const int32x4_t s = vsubq_s32(vpaddq_s32(acc[r][2 * v], acc[r][2 * v + 1]), corr);
        const float32x4_t gv = vld1q_f32(gs + g * PANEL + qtr * 8 + 4 * v);
        vst1q_f32(tile[r] + 4 * v, vfmaq_f32(vld1q_f32(tile[r] + 4 * v), gv, vcvtq_f32_s32(s)));
      }
    }
  }
  const int c0 = qtr * 8, cn = ncols - c0 < 8 ? ncols - c0 : 8;
  for (int r = 0; r < MR; ++r)
    for (int c = 0; c < cn; ++c) y[r * p.N + c0 + c] = a.scale[r] * tile[r][c] + ro[c0 + c] * a.xsum[r];
}

template <int MR>
void kernel_neon_mr(const Problem& p, const ActPanel& a, const uint8_t* w, const float* gs, const float* ro,
                    float* y, int ncols) {
  for (int qtr = 0; qtr < PANEL / 8 && qtr * 8 < ncols; ++qtr) kernel_neon_quarter<MR>(p, a, w, gs, ro, y, ncols, qtr);
}

void kernel_neon(const Problem& p, const ActPanel& a, const uint8_t* w, const float* gs, const float* ro,
                 float* y, int ncols) {
  static_assert(NEON_MR == 4, "dispatch below covers mr = 1..4");
  switch (a.mr) {
    case 1: return kernel_neon_mr<1>(p, a, w, gs, ro, y, ncols);
    case 2: return kernel_neon_mr<2>(p, a, w, gs, ro, y, ncols);
    case 3: return kernel_neon_mr<3>(p, a, w, gs, ro, y, ncols);
    default: return kernel_neon_mr<4>(p, a, w, gs, ro, y, ncols);
  }
}

}  // namespace

const Ops* neon_ops() {
  static const Ops ops = {NEON_MR, scalar_ops()->quantize_row, scalar_ops()->expand_panel, kernel_neon};
  return &ops;
}

}  // namespace bonsai

#else

namespace bonsai {
const Ops* neon_ops() { return nullptr; }
}  // namespace bonsai

#endif
