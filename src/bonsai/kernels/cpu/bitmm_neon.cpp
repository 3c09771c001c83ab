// AArch64 NEON path of the CPU 1-bit matmul (Apple Silicon, ARM servers). Baseline NEON: int8 x int8
// widening multiplies (vmull_s8) with pairwise accumulation (vpadalq_s16). Built for a CPU with the
// dot product extension (__ARM_FEATURE_DOTPROD: setup.py builds for Apple M1 and later on Apple Silicon
// Macs, which all have it; elsewhere -march=...+dotprod in CFLAGS), it uses sdot instead: 16
// multiply-adds per instruction where the baseline needs a widening multiply and a pairwise add per 8.
// Quantization, panel expansion and the tile write reuse the scalar versions. The scalar kernel in
// bitmm.cpp is its reference.
#include "bitmm.h"

#if defined(__aarch64__)
#include <arm_neon.h>

namespace bonsai {
namespace {

constexpr int NEON_MR = 4;

// The integer sums of k4 steps j .. end - 1 for MR rows x 8 columns: sums[r][v] holds columns 4v ..
// 4v + 3 of the quarter.
template <int MR>
inline void quarter_sums(const ActPanel& a, const uint8_t* w, int64_t j, int64_t end, int qtr, int32x4_t sums[MR][2]) {
#if defined(__ARM_FEATURE_DOTPROD)
  for (int r = 0; r < MR; ++r) sums[r][0] = sums[r][1] = vdupq_n_s32(0);
  for (; j < end; ++j) {
    const int8x16_t w0 = vld1q_s8((const int8_t*)(w + j * PANEL_BYTES + qtr * 32));  // columns 0-3, 4 k each
    const int8x16_t w1 = vld1q_s8((const int8_t*)(w + j * PANEL_BYTES + qtr * 32 + 16));
    for (int r = 0; r < MR; ++r) {
      const int8x16_t xb = vreinterpretq_s8_s32(vld1q_dup_s32((const int32_t*)(a.q + (j * MR + r) * 4)));
      sums[r][0] = vdotq_s32(sums[r][0], w0, xb);
      sums[r][1] = vdotq_s32(sums[r][1], w1, xb);
    }
  }
#else
  int32x4_t acc[MR][4];  // [2v + h]: columns 4v + 2h, 4v + 2h + 1, two k pairs each
  for (int r = 0; r < MR; ++r)
    for (int i = 0; i < 4; ++i) acc[r][i] = vdupq_n_s32(0);
  for (; j < end; ++j) {
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
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < 2; ++v) sums[r][v] = vpaddq_s32(acc[r][2 * v], acc[r][2 * v + 1]);
#endif
}

// MR rows x 8 columns (a quarter of a panel) over k4 steps [j0, j1): integer sums of a group that
// continues past j1 wait in t.acc, finished groups go to t.f (as the scalar kernel does).
template <int MR>
void kernel_neon_quarter(const Problem& p, const ActPanel& a, const uint8_t* w, Tile t,
                         int64_t j0, int64_t j1, int qtr) {
  const int64_t g4 = p.gpad / 4;
  for (int64_t g = j0 / g4, j = j0; j < j1; ++g) {
    const int64_t gend = (g + 1) * g4, end = gend < j1 ? gend : j1;
    const bool continued = j % g4 != 0;
    int32x4_t sums[MR][2];
    quarter_sums<MR>(a, w, j, end, qtr, sums);
    j = end;
    for (int r = 0; r < MR; ++r) {
      const int32x4_t corr = vdupq_n_s32(a.sumx[g * MR + r]);
      for (int v = 0; v < 2; ++v) {
        int32_t* held = t.acc + r * PANEL + qtr * 8 + 4 * v;
        int32x4_t sum = sums[r][v];
        if (continued) sum = vaddq_s32(sum, vld1q_s32(held));
        if (end < gend) {
          vst1q_s32(held, sum);
          continue;
        }
        float* f = t.f + r * PANEL + qtr * 8 + 4 * v;
        const float32x4_t gv = vld1q_f32(t.gs + g * PANEL + qtr * 8 + 4 * v);
        vst1q_f32(f, vfmaq_f32(vld1q_f32(f), gv, vcvtq_f32_s32(vsubq_s32(sum, corr))));
      }
    }
  }
}

template <int MR>
void kernel_neon_mr(const Problem& p, const ActPanel& a, const uint8_t* w, Tile t, int64_t j0,
                    int64_t j1, int ncols) {
  for (int qtr = 0; qtr < PANEL / 8 && qtr * 8 < ncols; ++qtr) kernel_neon_quarter<MR>(p, a, w, t, j0, j1, qtr);
}

void kernel_neon(const Problem& p, const ActPanel& a, const uint8_t* w, Tile t, int64_t j0,
                 int64_t j1, int ncols) {
  static_assert(NEON_MR == 4, "dispatch below covers mr = 1..4");
  switch (a.mr) {
    case 1: return kernel_neon_mr<1>(p, a, w, t, j0, j1, ncols);
    case 2: return kernel_neon_mr<2>(p, a, w, t, j0, j1, ncols);
    case 3: return kernel_neon_mr<3>(p, a, w, t, j0, j1, ncols);
    default: return kernel_neon_mr<4>(p, a, w, t, j0, j1, ncols);
  }
}

}  // namespace

const Ops* neon_ops() {
  static const Ops ops = {NEON_MR,     4,  scalar_ops()->quantize_row, lowrank_row_scalar, scalar_ops()->expand_panel,
                          kernel_neon, write_tile_scalar, prologue_row_scalar, epilogue_tile_scalar, epilogue_norms_scalar, nullptr, nullptr};
  return &ops;
}

}  // namespace bonsai

#else

namespace bonsai {
const Ops* neon_ops() { return nullptr; }
}  // namespace bonsai

#endif
