// x86 paths of the CPU 1-bit matmul: AVX2+FMA and AVX-512 (BW + VNNI), compiled with per-function
// target attributes so the library runs on any x86-64 and picks a path at run time (the AMX path,
// bitmm_amx.cpp, reuses the AVX-512 pieces declared in bitmm.h).
// The scalar versions in bitmm.cpp define what each function must compute.
#include "bitmm.h"

#ifdef BONSAI_X86
#include <cpuid.h>
#include <immintrin.h>

namespace bonsai {
namespace {

// ---------------------------------------------------------------- AVX2 + FMA
constexpr int AVX2_MR = 4;
constexpr int64_t AVX2_CHUNK = 64;  // k4 steps summed in int16: 64 * 508 < 32767

TARGET_AVX2 float hmax8(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps(m, m, 1)));
}

TARGET_AVX2 float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)));
}

TARGET_AVX2 __m256i tail_mask8(int64_t n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32((int)(n < 8 ? n : 8)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

TARGET_AVX2 __m256 load_scaled8(const Problem& p, const float* x, int64_t k, __m256i mask) {
  __m256 v = _mm256_maskload_ps(x + k, mask);
  return p.col_scale ? _mm256_mul_ps(v, _mm256_maskload_ps(p.col_scale + k, mask)) : v;
}

TARGET_AVX2 void quantize_row_avx2(const Problem& p, const float* x, int8_t* q, float* scale, float* xsum,
                                   int32_t* qsum) {
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  __m256 amax = _mm256_setzero_ps(), sum = _mm256_setzero_ps();
  for (int64_t k = 0; k < p.K; k += 8) {
    const __m256i mask = tail_mask8(p.K - k);
    sum = _mm256_add_ps(sum, _mm256_maskload_ps(x + k, mask));
    amax = _mm256_max_ps(amax, _mm256_and_ps(load_scaled8(p, x, k, mask), absmask));
  }
  const float am = hmax8(amax);
  const __m256 inv = _mm256_set1_ps(am > 0.f ? 127.f / am : 0.f);
  *scale = am / 127.f;
  *xsum = hsum8(sum);
  const __m256i lo = _mm256_set1_epi32(-127), hi = _mm256_set1_epi32(127);
  __m256i qs = _mm256_setzero_si256();  // lanes past K quantize 0
  for (int64_t k = 0; k < p.K; k += 8) {
    const __m256i mask = tail_mask8(p.K - k);
    __m256i i = _mm256_cvtps_epi32(_mm256_mul_ps(load_scaled8(p, x, k, mask), inv));
    i = _mm256_min_epi32(_mm256_max_epi32(i, lo), hi);
    qs = _mm256_add_epi32(qs, i);
    const __m128i w16 = _mm_packs_epi32(_mm256_castsi256_si128(i), _mm256_extracti128_si256(i, 1));
    const __m128i b8 = _mm_packs_epi16(w16, w16);
    if (p.K - k >= 8) {
      _mm_storel_epi64((__m128i*)(q + k), b8);
    } else {
      int8_t tmp[16];
      _mm_storeu_si128((__m128i*)tmp, b8);
      memcpy(q + k, tmp, (size_t)(p.K - k));
    }
  }
  const __m128i q4 = _mm_add_epi32(_mm256_castsi256_si128(qs), _mm256_extracti128_si256(qs, 1));
  const __m128i q2 = _mm_add_epi32(q4, _mm_unpackhi_epi64(q4, q4));
  *qsum = _mm_cvtsi128_si32(_mm_add_epi32(q2, _mm_shuffle_epi32(q2, 1)));
}

// 32 sign bits -> 32 bytes, byte i = 2 if bit i is set else 0.
TARGET_AVX2 __m256i expand32(uint32_t bits) {
  const __m256i shuf = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                                        2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
  const __m256i bitsel = _mm256_set1_epi64x((long long)0x8040201008040201ull);
  const __m256i v = _mm256_shuffle_epi8(_mm256_set1_epi32((int)bits), shuf);
  return _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(v, bitsel), bitsel), _mm256_set1_epi8(2));
}

// In-register transpose of an 8x8 matrix of 32-bit elements.
TARGET_AVX2 void transpose8x8(__m256i r[8]) {
  __m256i t[8], u[8];
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int h = 0; h < 2; ++h) {  // u[4h + e]: rows 4h..4h+3 at in-lane column e
    u[4 * h + 0] = _mm256_unpacklo_epi64(t[4 * h], t[4 * h + 2]);
    u[4 * h + 1] = _mm256_unpackhi_epi64(t[4 * h], t[4 * h + 2]);
    u[4 * h + 2] = _mm256_unpacklo_epi64(t[4 * h + 1], t[4 * h + 3]);
    u[4 * h + 3] = _mm256_unpackhi_epi64(t[4 * h + 1], t[4 * h + 3]);
  }
  for (int e = 0; e < 4; ++e) {
    r[e] = _mm256_permute2x128_si256(u[e], u[4 + e], 0x20);
    r[4 + e] = _mm256_permute2x128_si256(u[e], u[4 + e], 0x31);
  }
}

TARGET_AVX2 void expand_panel_avx2(const Problem& p, int64_t n0, int64_t j0, int64_t j1, uint8_t* w) {
  for_each_chunk(p, 32, j0 * 4, j1 * 4, [&](int64_t kp, int64_t k, int nb, int nvalid) TARGET_AVX2 {
    for (int rg = 0; rg < PANEL / 8; ++rg) {
      __m256i v[8];
      for (int i = 0; i < 8; ++i) v[i] = expand32((uint32_t)row_bits(p, n0 + rg * 8 + i, k, nvalid));
      transpose8x8(v);
      for (int j = 0; j < nb / 4; ++j) _mm256_store_si256((__m256i*)(w + (kp / 4 + j) * PANEL_BYTES + rg * 32), v[j]);
    }
  });
}

}  // namespace

namespace x86 {
// lowrank_row_scalar 8 ranks at a time with k outermost: 8 independent FMA chains (one dot product
// per rank was bound by its FMA latency: a tenth of a bonsai-emoji image), then a horizontal add tree.
TARGET_AVX2 void lowrank_row_avx2(const Problem& p, const float* x, float* t) {
  for (int64_t j0 = 0; j0 < p.rank_pad; j0 += 8) {
    const float* v[8];
    for (int jj = 0; jj < 8; ++jj) v[jj] = p.lowrank_v + (j0 + jj < p.rank ? j0 + jj : p.rank - 1) * p.K;
    __m256 acc[8];
    for (int jj = 0; jj < 8; ++jj) acc[jj] = _mm256_setzero_ps();
    for (int64_t k = 0; k < p.K; k += 8) {
      const __m256i m = tail_mask8(p.K - k);
      const __m256 xv = _mm256_maskload_ps(x + k, m);
      for (int jj = 0; jj < 8; ++jj) acc[jj] = _mm256_fmadd_ps(xv, _mm256_maskload_ps(v[jj] + k, m), acc[jj]);
    }
    // hadd twice: per 128-bit half, the partial sums of ranks 0-3 and 4-7; the halves added last
    const __m256 s0123 = _mm256_hadd_ps(_mm256_hadd_ps(acc[0], acc[1]), _mm256_hadd_ps(acc[2], acc[3]));
    const __m256 s4567 = _mm256_hadd_ps(_mm256_hadd_ps(acc[4], acc[5]), _mm256_hadd_ps(acc[6], acc[7]));
    const __m256 sums = _mm256_add_ps(_mm256_permute2f128_ps(s0123, s4567, 0x20), _mm256_permute2f128_ps(s0123, s4567, 0x31));
    _mm256_storeu_ps(t + j0, _mm256_and_ps(sums, _mm256_castsi256_ps(tail_mask8(p.rank - j0))));
  }
}

// write_tile_scalar's sums in 8-column groups: bias and row offsets in registers across the rows, and
// U's bfloat16 pairs (8 columns x 2 ranks, one load) widened in registers, rows four at a time. The
// generic loops, vectorized by the compiler, spilled their sums and took a fifth of a bonsai-emoji image.
TARGET_AVX2 void write_tile_avx2(const Problem& p, const ActPanel& a, Tile tile, int ncols, float* y, int64_t ldy) {
  constexpr int RB = 4;
  for (int c0 = 0; c0 < ncols; c0 += 8) {
    const int64_t n = tile.n0 + c0;
    const __m256i m = tail_mask8(ncols - c0);
    const __m256 bias = p.bias ? _mm256_maskload_ps(p.bias + n, m) : _mm256_setzero_ps();
    const __m256 ro = p.row_offset ? _mm256_maskload_ps(p.row_offset + n, m) : _mm256_setzero_ps();
    for (int r0 = 0; r0 < a.mr; r0 += RB) {
      __m256 acc[RB];
      const float* t[RB];
      for (int i = 0; i < RB; ++i) {
        const int r = r0 + i < a.mr ? r0 + i : a.mr - 1;  // past the tile: the last row again, not stored
        acc[i] = _mm256_fmadd_ps(_mm256_set1_ps(a.scale[r]), _mm256_loadu_ps(tile.f + r * PANEL + c0),
                                 _mm256_fmadd_ps(ro, _mm256_set1_ps(a.xsum[r]), bias));
        t[i] = a.lrt + r * p.rank_pad;
      }
      for (int64_t j = 0; j < p.rank; j += 2) {  // lrt and U are zero past the rank
        const __m256i pair = _mm256_loadu_si256((const __m256i*)lowrank_pairs(p, n, j));
        const __m256 even = _mm256_castsi256_ps(_mm256_slli_epi32(pair, 16));
        const __m256 odd = _mm256_castsi256_ps(_mm256_and_si256(pair, _mm256_set1_epi32((int)0xffff0000u)));
        for (int i = 0; i < RB; ++i)
          acc[i] = _mm256_fmadd_ps(_mm256_set1_ps(t[i][j + 1]), odd, _mm256_fmadd_ps(_mm256_set1_ps(t[i][j]), even, acc[i]));
      }
      for (int i = 0; i < RB && r0 + i < a.mr; ++i) _mm256_maskstore_ps(y + (r0 + i) * ldy + c0, m, acc[i]);
    }
  }
}
}  // namespace x86

namespace {

// MR rows x 16 columns (half of a panel): int16 sums over at most AVX2_CHUNK steps, then int32
// and float running sums in the tile.
template <int MR>
TARGET_AVX2 void kernel_avx2_half(const Problem& p, const ActPanel& a, const uint8_t* w, Tile t, int64_t j0,
                                  int64_t j1, int h) {
  const int32_t* xq = (const int32_t*)a.q;
  const int64_t g4 = p.gpad / 4;
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t g = j0 / g4, j = j0; j < j1; ++g) {
    const int64_t gend = (g + 1) * g4, end = gend < j1 ? gend : j1;
    if (j == g * g4)
      for (int r = 0; r < MR; ++r) memset(t.acc + r * PANEL + h * 16, 0, 16 * sizeof(int32_t));
    for (; j < end;) {
      const int64_t cend = j + AVX2_CHUNK < end ? j + AVX2_CHUNK : end;
      __m256i acc[MR][2];
      for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
      for (; j < cend; ++j) {
        const __m256i w0 = _mm256_load_si256((const __m256i*)(w + j * PANEL_BYTES + h * 64));
        const __m256i w1 = _mm256_load_si256((const __m256i*)(w + j * PANEL_BYTES + h * 64 + 32));
        for (int r = 0; r < MR; ++r) {
          const __m256i xb = _mm256_set1_epi32(xq[j * MR + r]);
          acc[r][0] = _mm256_add_epi16(acc[r][0], _mm256_maddubs_epi16(w0, xb));
          acc[r][1] = _mm256_add_epi16(acc[r][1], _mm256_maddubs_epi16(w1, xb));
        }
      }
      for (int r = 0; r < MR; ++r)
        for (int v = 0; v < 2; ++v) {
          __m256i* dst = (__m256i*)(t.acc + r * PANEL + h * 16 + 8 * v);
          _mm256_storeu_si256(dst, _mm256_add_epi32(_mm256_loadu_si256(dst), _mm256_madd_epi16(acc[r][v], ones)));
        }
    }
    if (end == gend) {
      for (int r = 0; r < MR; ++r) {
        const __m256i corr = _mm256_set1_epi32(a.sumx[g * MR + r]);
        for (int v = 0; v < 2; ++v) {
          const int c = h * 16 + 8 * v;
          const __m256i sum = _mm256_loadu_si256((const __m256i*)(t.acc + r * PANEL + c));
          const __m256 s = _mm256_cvtepi32_ps(_mm256_sub_epi32(sum, corr));
          float* f = t.f + r * PANEL + c;
          _mm256_storeu_ps(f, _mm256_fmadd_ps(_mm256_loadu_ps(t.gs + g * PANEL + c), s, _mm256_loadu_ps(f)));
        }
      }
    }
  }
}

template <int MR>
TARGET_AVX2 void kernel_avx2_mr(const Problem& p, const ActPanel& a, const uint8_t* w, Tile t,
                                int64_t j0, int64_t j1, int ncols) {
  for (int h = 0; h < 2 && h * 16 < ncols; ++h) kernel_avx2_half<MR>(p, a, w, t, j0, j1, h);
}

using KernelFn = void (*)(const Problem&, const ActPanel&, const uint8_t*, Tile, int64_t, int64_t, int);

void kernel_avx2(const Problem& p, const ActPanel& a, const uint8_t* w, Tile t, int64_t j0,
                 int64_t j1, int ncols) {
  static const KernelFn by_rows[AVX2_MR] = {kernel_avx2_mr<1>, kernel_avx2_mr<2>, kernel_avx2_mr<3>, kernel_avx2_mr<4>};
  by_rows[a.mr - 1](p, a, w, t, j0, j1, ncols);
}

const Ops AVX2_OPS = {AVX2_MR,           4,
                      quantize_row_avx2, x86::lowrank_row_avx2,
                      expand_panel_avx2, kernel_avx2,
                      x86::write_tile_avx2, x86::prologue_row_avx2,
                      x86::epilogue_tile_avx2, x86::epilogue_norms_avx2, nullptr,
                      nullptr};

// ---------------------------------------------------------------- AVX2 + AVX-VNNI
// Intel since Alder Lake (laptops and desktops without AVX-512) and AMD since Zen 5: vpdpbusd on 256
// bits, one instruction per 32 multiply-adds into int32 where the AVX2 path needs vpmaddubsw and an
// int16 add (and int16 sums flushed every AVX2_CHUNK steps). The AVX2 path's other pieces, unchanged.
#if (defined(__clang__) && __clang_major__ >= 12) || (!defined(__clang__) && __GNUC__ >= 11)
#if !defined(BONSAI_NO_AVX_VNNI)
#define BONSAI_AVX_VNNI 1
#define TARGET_AVX_VNNI __attribute__((target("avx2,fma,avxvnni")))
constexpr int VNNI_MR = 6;  // 12 accumulators, 2 weight registers and a broadcast: 15 of 16 ymm

// MR rows x one 16-column half: int32 sums of the current group in registers, finished groups in t.f.
template <int MR>
TARGET_AVX_VNNI void kernel_avx_vnni_half(const Problem& p, const ActPanel& a, const uint8_t* w, Tile t,
                                          int64_t j0, int64_t j1, int h) {
  const int32_t* xq = (const int32_t*)a.q;
  const int64_t g4 = p.gpad / 4;
  __m256i acc[MR][2];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < 2; ++v)
      acc[r][v] = j0 % g4 ? _mm256_loadu_si256((const __m256i*)(t.acc + r * PANEL + h * 16 + 8 * v))
                          : _mm256_setzero_si256();
  for (int64_t g = j0 / g4, j = j0; j < j1; ++g) {
    const int64_t gend = (g + 1) * g4, end = gend < j1 ? gend : j1;
    for (; j < end; ++j) {
      const __m256i w0 = _mm256_load_si256((const __m256i*)(w + j * PANEL_BYTES + h * 64));
      const __m256i w1 = _mm256_load_si256((const __m256i*)(w + j * PANEL_BYTES + h * 64 + 32));
      for (int r = 0; r < MR; ++r) {
        const __m256i xb = _mm256_set1_epi32(xq[j * MR + r]);
        acc[r][0] = _mm256_dpbusd_avx_epi32(acc[r][0], w0, xb);
        acc[r][1] = _mm256_dpbusd_avx_epi32(acc[r][1], w1, xb);
      }
    }
    if (end == gend) {
      for (int r = 0; r < MR; ++r) {
        const __m256i corr = _mm256_set1_epi32(a.sumx[g * MR + r]);
        for (int v = 0; v < 2; ++v) {
          const int c = h * 16 + 8 * v;
          const __m256 s = _mm256_cvtepi32_ps(_mm256_sub_epi32(acc[r][v], corr));
          float* f = t.f + r * PANEL + c;
          _mm256_storeu_ps(f, _mm256_fmadd_ps(_mm256_loadu_ps(t.gs + g * PANEL + c), s, _mm256_loadu_ps(f)));
          acc[r][v] = _mm256_setzero_si256();
        }
      }
    }
  }
  if (j1 % g4)
    for (int r = 0; r < MR; ++r)
      for (int v = 0; v < 2; ++v) _mm256_storeu_si256((__m256i*)(t.acc + r * PANEL + h * 16 + 8 * v), acc[r][v]);
}

template <int MR>
TARGET_AVX_VNNI void kernel_avx_vnni_mr(const Problem& p, const ActPanel& a, const uint8_t* w, Tile t,
                                        int64_t j0, int64_t j1, int ncols) {
  for (int h = 0; h < 2 && h * 16 < ncols; ++h) kernel_avx_vnni_half<MR>(p, a, w, t, j0, j1, h);
}

void kernel_avx_vnni(const Problem& p, const ActPanel& a, const uint8_t* w, Tile t, int64_t j0,
                     int64_t j1, int ncols) {
  static const KernelFn by_rows[VNNI_MR] = {kernel_avx_vnni_mr<1>, kernel_avx_vnni_mr<2>, kernel_avx_vnni_mr<3>,
                                            kernel_avx_vnni_mr<4>, kernel_avx_vnni_mr<5>, kernel_avx_vnni_mr<6>};
  by_rows[a.mr - 1](p, a, w, t, j0, j1, ncols);
}

const Ops AVX_VNNI_OPS = {VNNI_MR,           4,
                          quantize_row_avx2, x86::lowrank_row_avx2,
                          expand_panel_avx2, kernel_avx_vnni,
                          x86::write_tile_avx2, x86::prologue_row_avx2,
                          x86::epilogue_tile_avx2, x86::epilogue_norms_avx2, nullptr,
                          nullptr};

// CPUID.(EAX=7, ECX=1):EAX bit 4.
bool cpu_has_avx_vnni() {
  unsigned eax, ebx, ecx, edx;
  return __get_cpuid_count(7, 1, &eax, &ebx, &ecx, &edx) && ((eax >> 4) & 1);
}
#endif
#endif

// ---------------------------------------------------------------- AVX-512 BW + VNNI
constexpr int AVX512_MR = 12;

TARGET_AVX512 __mmask16 tail_mask16(int64_t n) {
  return n >= 16 ? (__mmask16)0xffff : n <= 0 ? (__mmask16)0 : (__mmask16)((1u << n) - 1);
}

}  // namespace

namespace x86 {

TARGET_AVX512 void quantize_row_avx512(const Problem& p, const float* x, int8_t* q, float* scale, float* xsum,
                                       int32_t* qsum) {
  __m512 amax = _mm512_setzero_ps(), sum = _mm512_setzero_ps();
  for (int64_t k = 0; k < p.K; k += 16) {
    const __mmask16 m = tail_mask16(p.K - k);
    __m512 v = _mm512_maskz_loadu_ps(m, x + k);
    sum = _mm512_add_ps(sum, v);
    if (p.col_scale) v = _mm512_mul_ps(v, _mm512_maskz_loadu_ps(m, p.col_scale + k));
    amax = _mm512_max_ps(amax, _mm512_abs_ps(v));
  }
  const float am = _mm512_reduce_max_ps(amax);
  const __m512 inv = _mm512_set1_ps(am > 0.f ? 127.f / am : 0.f);
  *scale = am / 127.f;
  *xsum = _mm512_reduce_add_ps(sum);
  const __m512i lo = _mm512_set1_epi32(-127), hi = _mm512_set1_epi32(127);
  __m512i qs = _mm512_setzero_si512();  // lanes past K quantize 0
  for (int64_t k = 0; k < p.K; k += 16) {
    const __mmask16 m = tail_mask16(p.K - k);
    __m512 v = _mm512_maskz_loadu_ps(m, x + k);
    if (p.col_scale) v = _mm512_mul_ps(v, _mm512_maskz_loadu_ps(m, p.col_scale + k));
    const __m512i i = _mm512_min_epi32(_mm512_max_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(v, inv)), lo), hi);
    qs = _mm512_add_epi32(qs, i);
    _mm512_mask_cvtepi32_storeu_epi8(q + k, m, i);
  }
  *qsum = _mm512_reduce_add_epi32(qs);
}

TARGET_AVX512 void stream_tile_avx512(const float* tile, int rows, float* y, int64_t ldy) {
  for (int r = 0; r < rows; ++r)
    for (int c = 0; c < PANEL; c += 16) _mm512_stream_ps(y + r * ldy + c, _mm512_loadu_ps(tile + r * PANEL + c));
}

// In-register transpose of a 16x16 matrix of 32-bit elements.
TARGET_AVX512 static void transpose16x16(__m512i r[16]) {
  __m512i t[16], u[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int qd = 0; qd < 4; ++qd) {  // u[4qd + e]: rows 4qd..4qd+3 at in-lane column e
    u[4 * qd + 0] = _mm512_unpacklo_epi64(t[4 * qd], t[4 * qd + 2]);
    u[4 * qd + 1] = _mm512_unpackhi_epi64(t[4 * qd], t[4 * qd + 2]);
    u[4 * qd + 2] = _mm512_unpacklo_epi64(t[4 * qd + 1], t[4 * qd + 3]);
    u[4 * qd + 3] = _mm512_unpackhi_epi64(t[4 * qd + 1], t[4 * qd + 3]);
  }
  for (int e = 0; e < 4; ++e) {  // 4x4 transpose of 128-bit lanes across u[e], u[4+e], u[8+e], u[12+e]
    const __m512i a = _mm512_shuffle_i32x4(u[e], u[4 + e], 0x44), b = _mm512_shuffle_i32x4(u[e], u[4 + e], 0xee);
    const __m512i c = _mm512_shuffle_i32x4(u[8 + e], u[12 + e], 0x44);
    const __m512i d = _mm512_shuffle_i32x4(u[8 + e], u[12 + e], 0xee);
    r[e] = _mm512_shuffle_i32x4(a, c, 0x88);
    r[4 + e] = _mm512_shuffle_i32x4(a, c, 0xdd);
    r[8 + e] = _mm512_shuffle_i32x4(b, d, 0x88);
    r[12 + e] = _mm512_shuffle_i32x4(b, d, 0xdd);
  }
}

TARGET_AVX512 void expand_panel_avx512(const Problem& p, int64_t n0, int64_t j0, int64_t j1, uint8_t* w) {
  const __m512i two = _mm512_set1_epi8(2);
  for_each_chunk(p, 64, j0 * 4, j1 * 4, [&](int64_t kp, int64_t k, int nb, int nvalid) TARGET_AVX512 {
    for (int half = 0; half < 2; ++half) {
      __m512i v[16];
      for (int i = 0; i < 16; ++i) v[i] = _mm512_maskz_mov_epi8(row_bits(p, n0 + half * 16 + i, k, nvalid), two);
      transpose16x16(v);
      for (int j = 0; j < nb / 4; ++j) _mm512_store_si512(w + (kp / 4 + j) * PANEL_BYTES + half * 64, v[j]);
    }
  });
}

// Sums of the lanes of a[0..15], as one vector: out[j] = sum of a[j] (a transposing add tree).
TARGET_AVX512 static __m512 lane_sums16(const __m512 a[16]) {
  __m512 t[8], u[4];
  for (int i = 0; i < 8; ++i)  // per 128-bit lane: a[2i] pair sums, a[2i+1] pair sums, interleaved
    t[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {  // per 128-bit lane: the lane sums of a[4i .. 4i + 3]
    const __m512d lo = _mm512_unpacklo_pd(_mm512_castps_pd(t[2 * i]), _mm512_castps_pd(t[2 * i + 1]));
    const __m512d hi = _mm512_unpackhi_pd(_mm512_castps_pd(t[2 * i]), _mm512_castps_pd(t[2 * i + 1]));
    u[i] = _mm512_add_ps(_mm512_castpd_ps(lo), _mm512_castpd_ps(hi));
  }
  const __m512 w01 = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], 0x44), _mm512_shuffle_f32x4(u[0], u[1], 0xee));
  const __m512 w23 = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], 0x44), _mm512_shuffle_f32x4(u[2], u[3], 0xee));
  return _mm512_add_ps(_mm512_shuffle_f32x4(w01, w23, 0x88), _mm512_shuffle_f32x4(w01, w23, 0xdd));
}

// 16 low-rank columns at a time, k outermost: x is loaded once per 16 FMAs. Rows of V past the rank
// are read as its last row (finite) and their sums zeroed.
TARGET_AVX512 void lowrank_row_avx512(const Problem& p, const float* x, float* t) {
  for (int64_t j0 = 0; j0 < p.rank; j0 += 16) {
    const float* v[16];
    for (int jj = 0; jj < 16; ++jj) v[jj] = p.lowrank_v + (j0 + jj < p.rank ? j0 + jj : p.rank - 1) * p.K;
    __m512 acc[16];
    for (int jj = 0; jj < 16; ++jj) acc[jj] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= p.K; k += 16) {
      const __m512 xv = _mm512_loadu_ps(x + k);
      for (int jj = 0; jj < 16; ++jj) acc[jj] = _mm512_fmadd_ps(xv, _mm512_loadu_ps(v[jj] + k), acc[jj]);
    }
    if (k < p.K) {
      const __mmask16 m = tail_mask16(p.K - k);
      const __m512 xv = _mm512_maskz_loadu_ps(m, x + k);
      for (int jj = 0; jj < 16; ++jj) acc[jj] = _mm512_fmadd_ps(xv, _mm512_maskz_loadu_ps(m, v[jj] + k), acc[jj]);
    }
    _mm512_storeu_ps(t + j0, _mm512_maskz_mov_ps(tail_mask16(p.rank - j0), lane_sums16(acc)));
  }
}

// lowrank_row_avx512 on up to 4 rows with one pass over V per 4 ranks: at K = 1280, V [16, K]
// (80 KiB) does not stay in L1, and a pass per row made the prologue L2-bound (~3600 cycles per
// row). Per row the same FMAs in the same order and the same sums: bit-identical.
TARGET_AVX512 static void lowrank_rows4(const Problem& p, const float* x, int rows, float* t) {
  constexpr int R = 4, J = 4;
  const float* xr[R];
  for (int r = 0; r < R; ++r) xr[r] = x + (r < rows ? r : rows - 1) * p.K;  // past rows: recompute the last
  for (int64_t j0 = 0; j0 < p.rank; j0 += 16) {
    __m512 sums[R][16];
    for (int jb = 0; jb < 16; jb += J) {
      const float* v[J];
      for (int jj = 0; jj < J; ++jj) v[jj] = p.lowrank_v + (j0 + jb + jj < p.rank ? j0 + jb + jj : p.rank - 1) * p.K;
      __m512 acc[R][J];
      for (int r = 0; r < R; ++r)
        for (int jj = 0; jj < J; ++jj) acc[r][jj] = _mm512_setzero_ps();
      for (int64_t k = 0; k < p.K; k += 16) {
        const __mmask16 m = tail_mask16(p.K - k);
        __m512 xv[R];
        for (int r = 0; r < R; ++r) xv[r] = _mm512_maskz_loadu_ps(m, xr[r] + k);
        for (int jj = 0; jj < J; ++jj) {
          const __m512 vv = _mm512_maskz_loadu_ps(m, v[jj] + k);
          for (int r = 0; r < R; ++r) acc[r][jj] = _mm512_fmadd_ps(xv[r], vv, acc[r][jj]);
        }
      }
      for (int r = 0; r < R; ++r)
        for (int jj = 0; jj < J; ++jj) sums[r][jb + jj] = acc[r][jj];
    }
    for (int r = 0; r < rows; ++r)
      _mm512_storeu_ps(t + r * p.rank_pad + j0, _mm512_maskz_mov_ps(tail_mask16(p.rank - j0), lane_sums16(sums[r])));
  }
}

TARGET_AVX512 void lowrank_rows_avx512(const Problem& p, const float* x, int rows, float* t) {
  for (int r0 = 0; r0 < rows; r0 += 4)
    lowrank_rows4(p, x + r0 * p.K, rows - r0 < 4 ? rows - r0 : 4, t + r0 * p.rank_pad);
}

TARGET_AVX512 void flush_group_avx512(const ActPanel& a, const int32_t* acc, const float* gs, int64_t g, float* f) {
  const __m512 g0 = _mm512_loadu_ps(gs + g * PANEL), g1 = _mm512_loadu_ps(gs + g * PANEL + 16);
  for (int r = 0; r < a.mr; ++r) {
    const __m512i corr = _mm512_set1_epi32(a.sumx[g * a.mr + r]);
    const int32_t* ar = acc + r * PANEL;
    float* fr = f + r * PANEL;
    const __m512 s0 = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_loadu_si512(ar), corr));
    const __m512 s1 = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_loadu_si512(ar + 16), corr));
    _mm512_storeu_ps(fr, _mm512_fmadd_ps(g0, s0, _mm512_loadu_ps(fr)));
    _mm512_storeu_ps(fr + 16, _mm512_fmadd_ps(g1, s1, _mm512_loadu_ps(fr + 16)));
  }
}

// One 16-column half at a time: the half's bias, row offsets and 16 columns of U.T stay in
// registers across the tile's rows; rows go eight at a time, interleaved (independent FMA chains).
TARGET_AVX512 void write_tile_avx512(const Problem& p, const ActPanel& a, const float* f, const float* lowrank,
                                     int64_t n0, int ncols, float* y, int64_t ldy) {
  constexpr int RB = 8;
  const bool fma_rank = p.rank && !lowrank;
  for (int h = 0; h * 16 < ncols; ++h) {
    const __mmask16 m = tail_mask16(ncols - 16 * h);
    const int64_t c0 = n0 + 16 * h;
    const __m512 bias = p.bias ? _mm512_maskz_loadu_ps(m, p.bias + c0) : _mm512_setzero_ps();
    const __m512 ro = p.row_offset ? _mm512_maskz_loadu_ps(m, p.row_offset + c0) : _mm512_setzero_ps();
    for (int64_t j0 = 0; j0 == 0 || (fma_rank && j0 < p.rank_pad); j0 += 16) {
      __m512 u[16];
      for (int jj = 0; fma_rank && jj < 16; jj += 2) {  // one 64-byte tile row: two ranks of 16 columns
        const __m512i pair = _mm512_loadu_si512(lowrank_pairs(p, c0, j0 + jj));
        u[jj] = _mm512_castsi512_ps(_mm512_slli_epi32(pair, 16));
        u[jj + 1] = _mm512_castsi512_ps(_mm512_and_si512(pair, _mm512_set1_epi32((int)0xffff0000u)));
      }
      for (int r0 = 0; r0 < a.mr; r0 += RB) {
        __m512 acc[RB];
        const float* t[RB];
        for (int i = 0; i < RB; ++i) {
          const int r = r0 + i < a.mr ? r0 + i : a.mr - 1;  // past the tile: recompute the last row, not stored
          acc[i] = j0 == 0 ? _mm512_add_ps(_mm512_fmadd_ps(ro, _mm512_set1_ps(a.xsum[r]), bias),
                                           _mm512_mul_ps(_mm512_set1_ps(a.scale[r]), _mm512_loadu_ps(f + r * PANEL + 16 * h)))
                           : _mm512_maskz_loadu_ps(m, y + r * ldy + 16 * h);
          if (lowrank) acc[i] = _mm512_add_ps(acc[i], _mm512_loadu_ps(lowrank + r * PANEL + 16 * h));
          t[i] = a.lrt + r * p.rank_pad + j0;
        }
        if (fma_rank)
          for (int jj = 0; jj < 16; ++jj)
            for (int i = 0; i < RB; ++i) acc[i] = _mm512_fmadd_ps(_mm512_set1_ps(t[i][jj]), u[jj], acc[i]);
        for (int i = 0; i < RB && r0 + i < a.mr; ++i) _mm512_mask_storeu_ps(y + (r0 + i) * ldy + 16 * h, m, acc[i]);
      }
    }
  }
}

}  // namespace x86

namespace {

using x86::quantize_row_avx512;
using x86::expand_panel_avx512;

// MR rows x 32 columns: int32 sums of the current group in registers, finished groups in t.f.
template <int MR>
TARGET_AVX512 void kernel_avx512_mr(const Problem& p, const ActPanel& a, const uint8_t* w, Tile t,
                                    int64_t j0, int64_t j1, int) {
  const int32_t* xq = (const int32_t*)a.q;
  const int64_t g4 = p.gpad / 4;
  __m512i acc[MR][2];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < 2; ++v)
      acc[r][v] = j0 % g4 ? _mm512_loadu_si512(t.acc + r * PANEL + 16 * v) : _mm512_setzero_si512();
  for (int64_t g = j0 / g4, j = j0; j < j1; ++g) {
    const int64_t gend = (g + 1) * g4, end = gend < j1 ? gend : j1;
    for (; j < end; ++j) {
      const __m512i w0 = _mm512_load_si512(w + j * PANEL_BYTES), w1 = _mm512_load_si512(w + j * PANEL_BYTES + 64);
      for (int r = 0; r < MR; ++r) {
        const __m512i xb = _mm512_set1_epi32(xq[j * MR + r]);
        acc[r][0] = _mm512_dpbusd_epi32(acc[r][0], w0, xb);
        acc[r][1] = _mm512_dpbusd_epi32(acc[r][1], w1, xb);
      }
    }
    if (end == gend) {
      for (int r = 0; r < MR; ++r) {
        const __m512i corr = _mm512_set1_epi32(a.sumx[g * MR + r]);
        for (int v = 0; v < 2; ++v) {
          float* f = t.f + r * PANEL + 16 * v;
          const __m512 s = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[r][v], corr));
          _mm512_storeu_ps(f, _mm512_fmadd_ps(_mm512_loadu_ps(t.gs + g * PANEL + 16 * v), s, _mm512_loadu_ps(f)));
          acc[r][v] = _mm512_setzero_si512();
        }
      }
    }
  }
  if (j1 % g4)
    for (int r = 0; r < MR; ++r)
      for (int v = 0; v < 2; ++v) _mm512_storeu_si512(t.acc + r * PANEL + 16 * v, acc[r][v]);
}

void kernel_avx512(const Problem& p, const ActPanel& a, const uint8_t* w, Tile t, int64_t j0,
                   int64_t j1, int ncols) {
  static const KernelFn by_rows[AVX512_MR] = {
      kernel_avx512_mr<1>, kernel_avx512_mr<2>, kernel_avx512_mr<3>, kernel_avx512_mr<4>,
      kernel_avx512_mr<5>, kernel_avx512_mr<6>, kernel_avx512_mr<7>, kernel_avx512_mr<8>,
      kernel_avx512_mr<9>, kernel_avx512_mr<10>, kernel_avx512_mr<11>, kernel_avx512_mr<12>};
  by_rows[a.mr - 1](p, a, w, t, j0, j1, ncols);
}

void write_tile_avx512(const Problem& p, const ActPanel& a, Tile t, int ncols, float* y, int64_t ldy) {
  x86::write_tile_avx512(p, a, t.f, nullptr, t.n0, ncols, y, ldy);
}

const Ops AVX512_OPS = {AVX512_MR,     4,
                        quantize_row_avx512, x86::lowrank_row_avx512,
                        expand_panel_avx512, kernel_avx512,
                        write_tile_avx512, x86::prologue_row_avx512,
                        x86::epilogue_tile_avx512, x86::epilogue_norms_avx512, nullptr,
                        nullptr,             x86::lowrank_rows_avx512, false, false, 0, x86::stream_tile_avx512};

}  // namespace

const Ops* avx2_ops() { return &AVX2_OPS; }
const Ops* avx512_ops() { return &AVX512_OPS; }
#ifdef BONSAI_AVX_VNNI
const Ops* avx_vnni_ops() { return &AVX_VNNI_OPS; }
#else
const Ops* avx_vnni_ops() { return nullptr; }
#endif

bool x86_has(Isa isa) {
  __builtin_cpu_init();
  switch (isa) {
    case ISA_AVX2: return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#ifdef BONSAI_AVX_VNNI
    case ISA_AVX_VNNI: return x86_has(ISA_AVX2) && cpu_has_avx_vnni();
#endif
    case ISA_AVX512:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("avx512f") &&
             __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
             __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vnni");
    default: return false;
  }
}

}  // namespace bonsai

#else

namespace bonsai {
const Ops* avx2_ops() { return nullptr; }
const Ops* avx512_ops() { return nullptr; }
const Ops* avx_vnni_ops() { return nullptr; }
bool x86_has(Isa) { return false; }
}  // namespace bonsai

#endif
