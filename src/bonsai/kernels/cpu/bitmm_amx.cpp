// AMX-INT8 path of the CPU 1-bit matmul (Intel Xeon since Sapphire Rapids). One tdpbsud multiplies
// a 16 x 64 tile of int8 activations by a 64 x 16 tile of {0, 2} weight bytes into 16 x 16 int32
// sums (16K multiply-adds per instruction, ~16x a vpdpbusd). The expanded panel of bitmm.cpp,
// wbuf[k4][32][4], already is the B-tile layout (16 k4 rows of one 16-column half, row stride 128
// bytes); activations are placed in 64-byte chunks per row (Ops::kunit = 64) so that 16 rows of a
// chunk are one A tile. Quantization, group flushes and the epilogue are the AVX-512 pieces, and the
// AVX-512 kernel is this kernel's reference; the panel expansion is its own (byte permutes, VBMI).
// With one group the kernel covers a whole pass over K per call (Ops::pass_steps), so the C tiles
// are stored once per pass, not per L1-sized chunk (those stores cost ~20% of a call). The low-rank
// residual's second product, (x V.T) U.T, runs on AMX-BF16 tiles as well (tdpbf16ps: x V.T rounded
// to bfloat16, U is stored in bfloat16, float32 sums): at K = 320 its rank-16 FMAs cost more than
// the 1-bit product.
// Linux hands out tile state only after arch_prctl(ARCH_REQ_XCOMP_PERM); without it, without the
// CPU feature, on other systems or with a compiler that lacks AMX (setup.py then defines
// BONSAI_NO_AMX), amx_ops() is null and the AVX-512 path runs.
#include "bitmm.h"

#if defined(BONSAI_X86) && defined(__x86_64__) && defined(__linux__) && !defined(BONSAI_NO_AMX) && \
    ((defined(__clang__) && __clang_major__ >= 12) || (!defined(__clang__) && __GNUC__ >= 11))
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#define TARGET_AMX                                                                                    \
  __attribute__((target("avx2,fma,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx512bf16,avx512vbmi,amx-tile," \
                         "amx-int8,amx-bf16")))

namespace bonsai {
namespace {

constexpr int AMX_MR = 32;   // rows per activation panel: two A tiles
constexpr int TILE_BYTES = 64;  // bytes per tile row (Ops::kunit)
constexpr int TILE_K4 = 16;  // k4 steps per tile
constexpr int ACC_STRIDE = PANEL * 4;  // bytes per row of t.acc
// k4 steps per pass over the output (3072 columns of K): 32 activation rows of a pass take 96 KiB,
// so an M-block of them stays in L2 at any K, and the expanded weights of a pass (96 KiB) are used by
// all of the block's rows. At K = 12288 a block held 64 rows before (each panel expanded per 64 rows).
constexpr int64_t AMX_PASS_STEPS = 768;

// A compiler barrier where tile loads and stores meet ordinary memory accesses: GCC's tile
// intrinsics do not declare the memory they touch.
inline void memory_barrier() { __asm__ __volatile__("" : : : "memory"); }

// Tile registers: C[m-half i][n-half h] = tmm(2i + h), A[i] = tmm(4 + i), B[h] = tmm(6 + h).
struct alignas(64) TileConfig {
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

TARGET_AMX void amx_begin() {
  TileConfig cfg = {};
  cfg.palette = 1;
  for (int i = 0; i < 8; ++i) {
    cfg.rows[i] = 16;
    cfg.colsb[i] = TILE_BYTES;
  }
  memory_barrier();  // GCC's _tile_loadconfig declares an 8-byte read: rows and colsb looked dead
  _tile_loadconfig(&cfg);
}

TARGET_AMX void amx_end() { _tile_release(); }

// Sign bits of 64 columns from k of weight rows n0 .. n0 + 15 (zero past N and past nvalid
// columns), rows n0 .. n0 + 7 in lo and the rest in hi: two gathers where the bits start on a byte
// and 8 bytes are left in the row, else read_bits per row.
TARGET_AMX inline void sign_rows16(const Problem& p, int64_t n0, int64_t k, int nvalid, __m512i& lo, __m512i& hi) {
  const int64_t b = k >> 3;
  if ((k & 7) == 0 && p.row_bytes - b >= 8) {
    const __m512i offsets =
        _mm512_mullo_epi64(_mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7), _mm512_set1_epi64(p.row_bytes));
    const __m512i keep = _mm512_set1_epi64(nvalid >= 64 ? -1ll : (long long)((1ull << nvalid) - 1));
    const int64_t rows = p.N - n0;
    const __mmask8 m_lo = (__mmask8)(rows >= 8 ? 0xff : rows <= 0 ? 0 : (1u << rows) - 1);
    const __mmask8 m_hi = (__mmask8)(rows >= 16 ? 0xff : rows <= 8 ? 0 : (1u << (rows - 8)) - 1);
    const uint8_t* base = p.signs + n0 * p.row_bytes + b;
    lo = _mm512_and_si512(_mm512_mask_i64gather_epi64(_mm512_setzero_si512(), m_lo, offsets, base, 1), keep);
    hi = _mm512_and_si512(
        _mm512_mask_i64gather_epi64(_mm512_setzero_si512(), m_hi, offsets, base + 8 * p.row_bytes, 1), keep);
    return;
  }
  alignas(64) uint64_t bits[16];
  for (int i = 0; i < 16; ++i) bits[i] = row_bits(p, n0 + i, k, nvalid);
  lo = _mm512_load_si512(bits);
  hi = _mm512_load_si512(bits + 8);
}

// expand_panel_avx512's bytes with one byte permute per two k4 rows instead of a dword transpose
// (AVX512-VBMI, which every AMX CPU has): vpermi2b copies byte b of weight row n into the 4 bytes
// of B-tile column n, and a bit test per byte gives k4 row 2b (bits 0-3) and 2b + 1 (bits 4-7).
TARGET_AMX void expand_chunk_amx(const Problem& p, int64_t n0, int64_t k, int nb, int nvalid, uint8_t* out) {
  const __m512i two = _mm512_set1_epi8(2);
  const __m512i low_bits = _mm512_set1_epi32(0x08040201), high_bits = _mm512_set1_epi32((int)0x80402010u);
  // Byte 4n + i of the permute index: byte b of row n, i.e. 8n + b (rows 8-15 in the second register).
  const __m512i row_start = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                               _mm512_set1_epi32(0x08080808));
  for (int half = 0; half < 2; ++half, out += 64) {
    __m512i lo, hi;
    sign_rows16(p, n0 + half * 16, k, nvalid, lo, hi);
    for (int j = 0; j < nb / 4; j += 2) {
      const __m512i v = _mm512_permutex2var_epi8(lo, _mm512_add_epi8(row_start, _mm512_set1_epi8((char)(j / 2))), hi);
      _mm512_store_si512(out + j * PANEL_BYTES, _mm512_maskz_mov_epi8(_mm512_test_epi8_mask(v, low_bits), two));
      if (j + 1 < nb / 4)
        _mm512_store_si512(out + (j + 1) * PANEL_BYTES, _mm512_maskz_mov_epi8(_mm512_test_epi8_mask(v, high_bits), two));
    }
  }
}

TARGET_AMX void expand_panel_amx(const Problem& p, int64_t n0, int64_t j0, int64_t j1, uint8_t* w) {
  for_each_chunk(p, 64, j0 * 4, j1 * 4, [&](int64_t kp, int64_t k, int nb, int nvalid) {
    expand_chunk_amx(p, n0, k, nb, nvalid, w + (kp / 4) * PANEL_BYTES);
  });
}

// C tiles <-> int32 [MR][PANEL] at acc, `stride` bytes per row (tile (i, h) at row 16i, column 16h).
template <bool TWO>
TARGET_AMX void store_acc(int32_t* acc, int64_t stride = ACC_STRIDE) {
  _tile_stored(0, acc, stride);
  _tile_stored(1, acc + 16, stride);
  if (TWO) {
    _tile_stored(2, (char*)acc + 16 * stride, stride);
    _tile_stored(3, (char*)(acc + 16) + 16 * stride, stride);
  }
  memory_barrier();
}

template <bool TWO>
TARGET_AMX void load_acc(const int32_t* acc, int64_t stride = ACC_STRIDE) {
  memory_barrier();
  _tile_loadd(0, acc, stride);
  _tile_loadd(1, acc + 16, stride);
  if (TWO) {
    _tile_loadd(2, (const char*)acc + 16 * stride, stride);
    _tile_loadd(3, (const char*)(acc + 16) + 16 * stride, stride);
  }
}

template <bool TWO>
TARGET_AMX void zero_acc() {
  _tile_zero(0);
  _tile_zero(1);
  if (TWO) {
    _tile_zero(2);
    _tile_zero(3);
  }
}

// Low-rank sums of the tile into out as float32 [mr][PANEL]: a.lrb (bfloat16, ranks in chunks of 32
// = one A tile row) times U.T in the tile layout of p.lowrank_ub. Rows past a.mr read the next
// rows or the buffer's slack (their sums are never stored). When the rank ends 16 into a chunk, the
// A tile's last 16 columns are zero and the B tile's last 8 rows read the next block (finite): they
// add nothing.
template <bool TWO>
TARGET_AMX void lowrank_tiles(const Problem& p, const ActPanel& a, Tile t, float* out) {
  const int64_t pairs = p.rank_pad / 2;  // B-tile rows per 16-column block
  const int64_t stride = lowrank_bf16_stride(p) * 2;  // bytes per row of a.lrb
  zero_acc<TWO>();
  memory_barrier();
  for (int64_t c0 = 0; c0 < p.rank_pad; c0 += 32) {
    const uint16_t* ub = lowrank_pairs(p, t.n0, c0);
    _tile_loadd(4, a.lrb + c0, stride);
    _tile_loadd(6, ub, TILE_BYTES);
    _tile_loadd(7, ub + pairs * 32, TILE_BYTES);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    if (TWO) {
      _tile_loadd(5, a.lrb + 16 * stride / 2 + c0, stride);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
  }
  store_acc<TWO>((int32_t*)out);
}

// x @ V.T for up to 16 rows (Ops::lowrank_rows) on AMX-BF16 tiles: x rounded to bfloat16 (half to
// even, vcvtne2ps2bf16) LR_CHUNK columns at a time into a stack buffer (the A tile rows), V from p.lowrank_vb, sums
// in float32 in C tiles 0 (and 1: ranks in pairs of 16-blocks). ~40x fewer instructions than the
// float32 FMAs at rank 16 (at K = 1280 those took a third of an fc2 call).
constexpr int LR_CHUNK = 512;

inline __mmask16 lanes(int64_t n) { return (__mmask16)(n >= 16 ? 0xffff : n <= 0 ? 0 : (1u << n) - 1); }

template <bool TWO>
TARGET_AMX void lowrank_block_amx(const Problem& p, const float* x, int rows, int64_t b0, float* t) {
  alignas(64) uint16_t xb[16 * LR_CHUNK];
  alignas(64) float c[16 * 16];
  const int64_t kt_total = (p.K + 31) / 32;
  _tile_zero(0);
  if (TWO) _tile_zero(1);
  for (int64_t k0 = 0; k0 < p.K; k0 += LR_CHUNK) {
    const int64_t width = (p.K - k0 < LR_CHUNK ? (p.K - k0 + 31) / 32 * 32 : LR_CHUNK);
    for (int r = 0; r < 16; ++r)
      for (int64_t c0 = 0; c0 < width; c0 += 32) {
        const int64_t valid = r < rows ? p.K - k0 - c0 : 0;  // columns of x left from c0
        const __m512 lo = _mm512_maskz_loadu_ps(lanes(valid), x + r * p.K + k0 + c0);
        const __m512 hi = _mm512_maskz_loadu_ps(lanes(valid - 16), x + r * p.K + k0 + c0 + 16);
        _mm512_store_si512(xb + r * LR_CHUNK + c0, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
      }
    memory_barrier();
    for (int64_t kk = 0; kk < width; kk += 32) {
      const int64_t kt = (k0 + kk) / 32;
      _tile_loadd(4, xb + kk, LR_CHUNK * 2);
      _tile_loadd(6, p.lowrank_vb + (b0 * kt_total + kt) * 512, TILE_BYTES);
      _tile_dpbf16ps(0, 4, 6);
      if (TWO) {
        _tile_loadd(7, p.lowrank_vb + ((b0 + 1) * kt_total + kt) * 512, TILE_BYTES);
        _tile_dpbf16ps(1, 4, 7);
      }
    }
  }
  for (int h = 0; h < (TWO ? 2 : 1); ++h) {
    if (h == 0)
      _tile_stored(0, c, TILE_BYTES);
    else
      _tile_stored(1, c, TILE_BYTES);
    memory_barrier();
    for (int r = 0; r < rows; ++r) memcpy(t + r * p.rank_pad + (b0 + h) * 16, c + r * 16, 16 * sizeof(float));
  }
}

TARGET_AMX void lowrank_rows_amx(const Problem& p, const float* x, int rows, float* t) {
  if (!p.lowrank_vb) return x86::lowrank_rows_avx512(p, x, rows, t);  // a caller without the tiles
  const int64_t blocks = p.rank_pad / 16;
  for (int64_t b0 = 0; b0 < blocks; b0 += 2) {
    if (blocks - b0 >= 2)
      lowrank_block_amx<true>(p, x, rows, b0, t);
    else
      lowrank_block_amx<false>(p, x, rows, b0, t);
  }
}

// Up to 16 (TWO: up to 32) rows x 32 columns. Rows past a.mr of a tile read neighbouring (or
// slack) bytes of the activation buffer; their sums are never used. The last K-chunk leaves the
// tile's low-rank sums in t.acc.
template <bool TWO>
TARGET_AMX void kernel_amx_rows(const Problem& p, const ActPanel& a, const uint8_t* w, Tile t,
                                int64_t j0, int64_t j1) {
  const int64_t g4 = p.gpad / 4;  // a multiple of TILE_K4
  if (j0 % g4 && t.carry)
    load_acc<TWO>(t.carry, t.carry_stride);
  else if (j0 % g4)
    load_acc<TWO>(t.acc);
  else
    zero_acc<TWO>();
  for (int64_t g = j0 / g4, j = j0; j < j1; ++g) {
    const int64_t gend = (g + 1) * g4, end = gend < j1 ? gend : j1;
    for (; j < end; j += TILE_K4) {
      const int8_t* aq = a.q + (j / TILE_K4) * a.mr * TILE_BYTES;
      _tile_loadd(4, aq, TILE_BYTES);
      _tile_loadd(6, w + j * PANEL_BYTES, PANEL_BYTES);
      _tile_loadd(7, w + j * PANEL_BYTES + 64, PANEL_BYTES);
      _tile_dpbsud(0, 4, 6);
      _tile_dpbsud(1, 4, 7);
      if (TWO) {
        _tile_loadd(5, aq + 16 * TILE_BYTES, TILE_BYTES);
        _tile_dpbsud(2, 5, 6);
        _tile_dpbsud(3, 5, 7);
      }
    }
    if (end == gend) {
      store_acc<TWO>(t.acc);
      if (p.ngroups == 1) break;  // write_tile_amx reads the sums from t.acc
      x86::flush_group_avx512(a, t.acc, t.gs, g, t.f);
      zero_acc<TWO>();
    }
  }
  if (j1 % g4 && t.carry)
    store_acc<TWO>(t.carry, t.carry_stride);
  else if (j1 % g4)
    store_acc<TWO>(t.acc);
  else if (p.rank && j1 == p.kpad / 4)
    lowrank_tiles<TWO>(p, a, t, p.ngroups == 1 ? t.f : (float*)t.acc);
}

void kernel_amx(const Problem& p, const ActPanel& a, const uint8_t* w, Tile t, int64_t j0,
                int64_t j1, int) {
  if (a.mr > 16)
    kernel_amx_rows<true>(p, a, w, t, j0, j1);
  else
    kernel_amx_rows<false>(p, a, w, t, j0, j1);
}

// One group: y = scale[r] * gs[c] * (acc[r][c] - sumx[r]) + low-rank + row_offset[c] * xsum[r] + bias[c]
// in one pass over the integer sums (no float tile in between).
TARGET_AMX void write_tile_direct(const Problem& p, const ActPanel& a, Tile t, int ncols, float* y, int64_t ldy) {
  const float* lowrank = p.rank ? t.f : nullptr;
  for (int h = 0; h * 16 < ncols; ++h) {
    const __mmask16 m = lanes(ncols - 16 * h);
    const int64_t c0 = t.n0 + 16 * h;
    const __m512 g = _mm512_loadu_ps(t.gs + 16 * h);
    const __m512 bias = p.bias ? _mm512_maskz_loadu_ps(m, p.bias + c0) : _mm512_setzero_ps();
    const __m512 ro = p.row_offset ? _mm512_maskz_loadu_ps(m, p.row_offset + c0) : _mm512_setzero_ps();
    const int32_t* acc = t.acc + 16 * h;
    float* yh = y + 16 * h;
    for (int r = 0; r < a.mr; ++r) {
      const __m512i sums = _mm512_sub_epi32(_mm512_load_si512(acc + r * PANEL), _mm512_set1_epi32(a.sumx[r]));
      __m512 v = _mm512_fmadd_ps(ro, _mm512_set1_ps(a.xsum[r]), bias);
      if (lowrank) v = _mm512_add_ps(v, _mm512_load_ps(lowrank + r * PANEL + 16 * h));
      v = _mm512_fmadd_ps(_mm512_mul_ps(g, _mm512_set1_ps(a.scale[r])), _mm512_cvtepi32_ps(sums), v);
      _mm512_mask_storeu_ps(yh + r * ldy, m, v);
    }
  }
}

void write_tile_amx(const Problem& p, const ActPanel& a, Tile t, int ncols, float* y, int64_t ldy) {
  if (p.ngroups == 1) return write_tile_direct(p, a, t, ncols, y, ldy);
  x86::write_tile_avx512(p, a, t.f, p.rank ? (const float*)t.acc : nullptr, t.n0, ncols, y, ldy);
}

// CPU has AMX-BF16, AMX-TILE and AMX-INT8 (CPUID.7.0:EDX bits 22, 24, 25), AVX512-VBMI (CPUID.7.0:ECX
// bit 1) and AVX512-BF16 (CPUID.7.1:EAX bit 5; every AMX CPU so far has both) and the kernel lets this
// process use tile data (permission is per process and covers threads started later as well).
bool amx_usable() {
  unsigned eax, ebx, ecx, edx;
  if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx) || !((edx >> 22) & 1) || !((edx >> 24) & 1) ||
      !((edx >> 25) & 1) || !((ecx >> 1) & 1))
    return false;
  if (!__get_cpuid_count(7, 1, &eax, &ebx, &ecx, &edx) || !((eax >> 5) & 1)) return false;  // AVX512-BF16
  constexpr long ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
  return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
}

const Ops AMX_OPS = {AMX_MR,           TILE_BYTES,         x86::quantize_row_avx512, x86::lowrank_row_avx512,
                     expand_panel_amx, kernel_amx, write_tile_amx, x86::prologue_row_avx512,
                     x86::epilogue_tile_avx512, x86::epilogue_norms_avx512, amx_begin, amx_end,
                     lowrank_rows_amx, true, true, AMX_PASS_STEPS, x86::stream_tile_avx512};

}  // namespace

const Ops* amx_ops() {
  static const bool usable = x86_has(ISA_AVX512) && amx_usable();
  return usable ? &AMX_OPS : nullptr;
}

}  // namespace bonsai

#else

namespace bonsai {
const Ops* amx_ops() { return nullptr; }
}  // namespace bonsai

#endif
