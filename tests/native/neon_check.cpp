// The NEON path of the CPU kernel against its scalar path, through the C API, on odd cases (groups,
// low-rank residuals, column scales, row offsets, bias, row-block order for small layers, several
// M-blocks). Built for aarch64 and run under qemu by tests/test_kernel_neon_qemu.py; exits 1 when a
// case differs by more than float rounding or a call fails.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

extern "C" {
struct BonsaiWeight {  // bitmm.cpp's C view of a layer (binding.py mirrors it too)
  const uint8_t* signs;
  int64_t N, K;
  const float* row_scale;
  int64_t group_size;
  const uint16_t* group_scale;
  const float* col_scale;
  const float* row_offset;
  int64_t rank;
  const float* lowrank_v;
  const uint16_t* lowrank_ub;
  const uint16_t* lowrank_vb;
};
int bonsai_bitmm(int isa, int nthreads, const BonsaiWeight* wt, const float* x, int64_t M, const float* bias,
                 float* y, const void* fusion);
int bonsai_bitmm_has_isa(int isa);
}

constexpr int ISA_SCALAR = 0, ISA_NEON = 3;

int main() {
  if (!bonsai_bitmm_has_isa(ISA_NEON)) {
    std::printf("no NEON path in this build\n");
    return 1;
  }
#if defined(__ARM_FEATURE_DOTPROD)
  std::printf("built with the dot product extension (sdot)\n");
#else
  std::printf("built for baseline NEON\n");
#endif
  // M, N, K, group size, rank
  const int64_t cases[][5] = {{1, 33, 203, 0, 0},     {45, 71, 1203, 0, 17}, {301, 70, 1100, 64, 3},
                              {17, 45, 203, 24, 0},   {512, 320, 320, 0, 16}, {512, 40, 1280, 0, 16},
                              {37, 45, 4099, 600, 2}};
  int failed = 0;
  for (const auto& c : cases) {
    const int64_t M = c[0], N = c[1], K = c[2], G = c[3], R = c[4];
    std::mt19937 gen((unsigned)(M * 131 + N * 7 + K));
    std::normal_distribution<float> normal;
    const int64_t row_bytes = (K + 7) / 8, groups = G ? (K + G - 1) / G : 1, rank_pad = (R + 15) / 16 * 16;
    std::vector<uint8_t> signs(N * row_bytes);
    for (auto& b : signs) b = (uint8_t)(gen() & 255);
    std::vector<float> row_scale(N), col_scale(K), row_offset(N), x(M * K), v(R * K), bias(N), y0(M * N), y1(M * N);
    for (auto& a : row_scale) a = 0.5f + std::fabs(normal(gen));
    for (auto& a : col_scale) a = 0.5f + std::fabs(normal(gen));
    for (auto& a : row_offset) a = 0.01f * normal(gen);
    for (auto& a : x) a = normal(gen);
    for (auto& a : v) a = 0.05f * normal(gen);
    for (auto& a : bias) a = normal(gen);
    // float16 group scales in [0.5, 1.5): exponent 0x3800..0x3c00 bits; bfloat16 U entries near +-0.05
    std::vector<uint16_t> group_scale(N * groups), ub(((N + 31) / 32 * 2 * (rank_pad / 2) + 8) * 32);
    for (auto& h : group_scale) h = (uint16_t)(0x3800 + (gen() % 0x800));
    for (auto& u : ub) u = (uint16_t)(0x3d4c ^ (gen() & 0x8000) ^ (gen() & 0x7f));
    const BonsaiWeight w = {signs.data(), N, K, row_scale.data(), G, G ? group_scale.data() : nullptr,
                            col_scale.data(), row_offset.data(), R, R ? v.data() : nullptr,
                            R ? ub.data() : nullptr, nullptr};
    const int s0 = bonsai_bitmm(ISA_SCALAR, 1, &w, x.data(), M, bias.data(), y0.data(), nullptr);
    const int s1 = bonsai_bitmm(ISA_NEON, 2, &w, x.data(), M, bias.data(), y1.data(), nullptr);
    double diff = 0, scale = 0;
    for (int64_t i = 0; i < M * N; ++i) {
      diff = std::fmax(diff, std::fabs((double)y0[i] - y1[i]));
      scale = std::fmax(scale, std::fabs((double)y0[i]));
    }
    const bool ok = s0 == 0 && s1 == 0 && scale > 0 && diff <= 1e-5 * scale;
    std::printf("M%lld N%lld K%lld G%lld R%lld: status %d/%d, max |neon - scalar| = %.2e of max |y| %s\n",
                (long long)M, (long long)N, (long long)K, (long long)G, (long long)R, s0, s1, diff / scale,
                ok ? "ok" : "FAILED");
    failed |= !ok;
  }
  return failed;
}
