// Shared layout, helpers and per-ISA entry points of the CPU 1-bit matmul (see bitmm.cpp).
#pragma once

#include <stddef.h>
#include <stdint.h>
#include <string.h>

namespace bonsai {

enum Isa : int { ISA_SCALAR = 0, ISA_AVX2 = 1, ISA_AVX512 = 2, ISA_NEON = 3, ISA_AMX = 4, ISA_AVX_VNNI = 5 };

// Output columns (weight rows) per weight panel. Every ISA expands a panel into the same
// byte layout: wbuf[k4][PANEL][4], byte = 2 where the sign is +1, else 0 (see bitmm.cpp).
constexpr int PANEL = 32;
constexpr int PANEL_BYTES = PANEL * 4;  // one k4 step of an expanded panel

// Row-wise operations fused into one call (mirrored by binding.Fusion; each part
// optional; what they compute is defined by bonsai/kernels/fusion.py). Row m belongs to sample
// m / rows_per_sample, which selects its row of shift, scale and gate.
struct Fusion {
  int64_t rows_per_sample;
  // Prologue (when layer_norm), on each row of x before quantization: LayerNorm over K, then
  // x * (1 + scale) + shift (when shift and scale are given).
  int64_t layer_norm;
  float ln_eps;
  const float* ln_weight;   // [K] or null
  const float* ln_bias;     // [K] or null
  const float* shift;       // [B, K] or null
  const float* scale;       // [B, K] or null
  // Epilogue, on each finished row of y: tanh-GELU (when gelu), then RMSNorm of each head of
  // norm_dim columns among the first norm_cols, which are norm_groups equal parts (the heads of
  // part g weighted by norm_weight[g]), then residual + gate * y.
  int64_t gelu;
  int64_t norm_cols;
  int64_t norm_dim;
  int64_t norm_groups;
  float norm_eps;
  const float* norm_weight;  // [norm_groups, norm_dim]
  const float* residual;     // [M, N] or null
  const float* gate;         // [B, N] or null
};

// One call: y[M, N] = x[M, K] @ W.T + bias with W given by the stored 1-bit layout, its scales and
// its low-rank residual U @ V.
struct Problem {
  const float* x;
  int64_t M, K, N;
  const uint8_t* signs;          // [N, row_bytes], bit j of byte b = column 8b + j, set = +1
  int64_t row_bytes;
  const float* row_scale;        // [N]
  const uint16_t* group_scale;   // float16 bits [N, ngroups] or null
  const float* col_scale;        // [K] or null (folded into the activations)
  const float* row_offset;       // [N] or null
  int64_t rank;                  // columns of U (0: no low-rank residual)
  int64_t rank_pad;              // rank rounded up to 16: row stride of the per-row factors x @ V.T
  const float* lowrank_v;        // [rank, K] float32 or null
  // U as stored (bfloat16) in the AMX-BF16 B-tile layout, which every path reads:
  // [ceil(N / 32) * 2][rank_pad / 2][16][2] and 8 more rows of 16 x 2 (16-column blocks of U.T, pairs
  // of ranks interleaved, zero-padded), or null.
  const uint16_t* lowrank_ub;
  // V as stored (bfloat16) in AMX-BF16 B tiles: [rank_pad / 16][ceil(K / 32)][16][16][2] (per 16 ranks
  // and 32 columns of K, pairs of columns interleaved, zero-padded), or null. Read by the AMX path.
  const uint16_t* lowrank_vb;
  const float* bias;             // [N] or null
  float* y;                      // [M, N]
  const Fusion* fusion;          // row-wise prologue / epilogue, or null
  // Derived layout: K is split into groups, each zero-padded to a multiple of Ops::kunit columns.
  int64_t gsize;                 // columns per group (K when there are no group scales)
  int64_t gpad;                  // gsize rounded up to kunit
  int64_t ngroups;
  int64_t kpad;                  // ngroups * gpad
};

// Quantized activations of up to `mr` rows, in chunks of kunit bytes per row (4: one broadcast
// dword per row for the vector dot products; 64: one AMX tile row).
struct ActPanel {
  const int8_t* q;      // [kpad / kunit][mr][kunit]
  const int32_t* sumx;  // [ngroups][mr]: sum of q over each group (the "-1" half of +-1)
  const float* scale;   // [mr] absmax / 127
  const float* xsum;    // [mr] sum of the raw x row (for row_offset)
  const float* lrt;     // [mr][rank_pad] x @ V.T of each row, zero past the rank (when rank > 0)
  int mr;
  const uint16_t* lrb;  // [mr][lowrank_bf16_stride] lrt in bfloat16, zero past the rank (Ops::lowrank_bf16)
};

// Running sums of one activation panel against one weight panel, kept between K-chunks.
struct Tile {
  int32_t* acc;  // [mr][PANEL] integer sum of the group in progress (when a chunk ends mid-group)
  float* f;      // [mr][PANEL] sum over finished groups of gs * (dot - sumx); zeroed by the driver
  int64_t n0;    // the weight panel's first output column
  const float* gs;  // [ngroups][PANEL] row_scale * group_scale of the panel's columns (0 past N)
  int32_t* carry;  // where the sums wait between passes (Ops::pass_steps), or null: acc
  int64_t carry_stride;  // bytes per row of carry
};

// The pieces each ISA provides; the driver in bitmm.cpp does the rest.
struct Ops {
  int mr;     // rows per activation panel
  int kunit;  // bytes per row and activation chunk; groups are zero-padded to a multiple of it
  // q[K] = round(x * col_scale / scale), scale = absmax / 127; xsum = sum of raw x; qsum = sum of q.
  void (*quantize_row)(const Problem& p, const float* x, int8_t* q, float* scale, float* xsum, int32_t* qsum);
  // t[rank_pad] = V @ x for one raw row x[K], zero past the rank (float32; the low-rank residual's
  // first factor).
  void (*lowrank_row)(const Problem& p, const float* x, float* t);
  // Expand weight rows n0 .. n0 + PANEL - 1 (rows >= N read as zero) into wbuf[kpad/4][PANEL][4], k4
  // steps j0 .. j1 - 1 (multiples of kunit / 4).
  void (*expand_panel)(const Problem& p, int64_t n0, int64_t j0, int64_t j1, uint8_t* wbuf);
  // Accumulate k4 steps [j0, j1) into the tile: f[r][c] += t.gs[g][c] * (int dot_g - sumx_g[r]) for
  // each group g finished in the range (columns c >= ncols may be skipped).
  void (*kernel)(const Problem& p, const ActPanel& a, const uint8_t* wbuf, Tile t, int64_t j0,
                 int64_t j1, int ncols);
  // The tile's output, y[r, c] for c < ncols (row stride ldy), from t.f of the finished tile:
  // scale[r] * f[r][c] + row_offset[n0 + c] * xsum[r] + bias[n0 + c] + sum_j lrt[r][j] * ut[j][n0 + c]
  // (the AMX path has the low-rank sum in t.acc already, as float32).
  void (*write_tile)(const Problem& p, const ActPanel& a, Tile t, int ncols, float* y, int64_t ldy);
  // The fused prologue of row m: out[K] = modulate(layer_norm(x[K])) (p.fusion is set).
  void (*prologue_row)(const Problem& p, int64_t m, const float* x, float* out);
  // The fused epilogue, in place (p.fusion is set), in two parts: on a finished tile, rows m0 ..
  // m0 + rows - 1 and columns n0 .. n0 + ncols - 1 (y points at (m0, n0), row stride ldy; run while it
  // is in L1): tanh-GELU, then the residual unless there are head norms; and on the whole finished
  // row m: head norms, then the residual.
  void (*epilogue_tile)(const Problem& p, int64_t m0, int rows, int64_t n0, int ncols, float* y, int64_t ldy);
  void (*epilogue_norms)(const Problem& p, int64_t m, float* y);
  // Per-thread set-up and tear-down around the kernel calls (AMX tile configuration), or null.
  void (*thread_begin)();
  void (*thread_end)();
  // lowrank_row for rows <= LOWRANK_ROWS consecutive rows x[rows][K] (t: row stride rank_pad), or
  // null (then lowrank_row runs per row). The AVX-512 version is bit-identical to lowrank_row; the
  // AMX version rounds x to bfloat16 (V is stored in bfloat16) and sums in float32 on tiles.
  void (*lowrank_rows)(const Problem& p, const float* x, int rows, float* t);
  // With one group (no group scales within K) kernel and write_tile go from the integer sums in
  // t.acc straight to y, and t.f holds the low-rank sums (or nothing): the driver need not zero it.
  bool direct_single_group;
  // The driver also keeps the low-rank factors in bfloat16 (ActPanel::lrb), rounded once per row.
  bool lowrank_bf16;
  // With one group: k4 steps per pass (0: one pass, whose kernel calls go KC_STEPS steps at a time).
  // Each pass runs over every output tile, and a tile's int32 sums wait in y (Tile::carry) between
  // passes; the kernel then covers a whole pass per call.
  int64_t pass_steps;
  // Copies a finished tile [rows][PANEL] to y (64-byte aligned, row stride ldy a multiple of 16) with
  // streaming stores, or null. See the driver for when.
  void (*stream_tile)(const float* tile, int rows, float* y, int64_t ldy);
};

constexpr int LOWRANK_ROWS = 16;  // one AMX tile of rows

// Row stride of ActPanel::lrb: the rank rounded up to 32 (one 64-byte AMX tile row of bfloat16).
static inline int64_t lowrank_bf16_stride(const Problem& p) { return (p.rank + 31) / 32 * 32; }

// U's bfloat16 for ranks j and j + 1 (j even) of column n, then those of the next columns of n's
// 16-column block: one row of the AMX-BF16 B tile in Problem::lowrank_ub (zero past N and the rank).
static inline const uint16_t* lowrank_pairs(const Problem& p, int64_t n, int64_t j) {
  return p.lowrank_ub + ((n / 16) * (p.rank_pad / 2) + j / 2) * 32 + (n % 16) * 2;
}

// float32 -> bfloat16 bits, rounding half to even (finite inputs).
static inline uint16_t bf16_bits(float v) {
  uint32_t bits;
  memcpy(&bits, &v, 4);
  return (uint16_t)((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

const Ops* scalar_ops();
const Ops* avx2_ops();    // null when not compiled in
const Ops* avx512_ops();  // null when not compiled in
const Ops* avx_vnni_ops();  // null when not compiled in
const Ops* neon_ops();    // null when not compiled in
const Ops* amx_ops();     // null when not compiled in, or when this CPU or OS cannot run AMX tiles
bool x86_has(Isa isa);    // this x86 CPU (and OS) runs the AVX2 / AVX-VNNI / AVX-512 path

// Shared between ISA paths: the portable low-rank row product and tile write (bitmm_rows.cpp; the
// AVX2 paths have their own), and the AVX-512 pieces the AMX path reuses.
void lowrank_row_scalar(const Problem& p, const float* x, float* t);
void write_tile_scalar(const Problem& p, const ActPanel& a, Tile t, int ncols, float* y, int64_t ldy);
// Fused row operations (bitmm_rows.cpp): one source, compiled for each vector width.
void prologue_row_scalar(const Problem& p, int64_t m, const float* x, float* out);
void epilogue_tile_scalar(const Problem& p, int64_t m0, int rows, int64_t n0, int ncols, float* y, int64_t ldy);
void epilogue_norms_scalar(const Problem& p, int64_t m, float* y);

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define BONSAI_X86 1
// Per-function targets: the library is built for baseline x86-64 and picks a path at run time.
#define TARGET_AVX2 __attribute__((target("avx2,fma")))
#define TARGET_AVX512 __attribute__((target("avx2,fma,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")))
namespace x86 {
TARGET_AVX2 void prologue_row_avx2(const Problem& p, int64_t m, const float* x, float* out);
TARGET_AVX2 void lowrank_row_avx2(const Problem& p, const float* x, float* t);
TARGET_AVX2 void write_tile_avx2(const Problem& p, const ActPanel& a, Tile t, int ncols, float* y, int64_t ldy);
TARGET_AVX2 void epilogue_tile_avx2(const Problem& p, int64_t m0, int rows, int64_t n0, int ncols, float* y,
                                    int64_t ldy);
TARGET_AVX2 void epilogue_norms_avx2(const Problem& p, int64_t m, float* y);
TARGET_AVX512 void prologue_row_avx512(const Problem& p, int64_t m, const float* x, float* out);
TARGET_AVX512 void epilogue_tile_avx512(const Problem& p, int64_t m0, int rows, int64_t n0, int ncols, float* y,
                                        int64_t ldy);
TARGET_AVX512 void epilogue_norms_avx512(const Problem& p, int64_t m, float* y);
TARGET_AVX512 void quantize_row_avx512(const Problem& p, const float* x, int8_t* q, float* scale, float* xsum,
                                       int32_t* qsum);
TARGET_AVX512 void expand_panel_avx512(const Problem& p, int64_t n0, int64_t j0, int64_t j1, uint8_t* w);
TARGET_AVX512 void lowrank_row_avx512(const Problem& p, const float* x, float* t);
TARGET_AVX512 void lowrank_rows_avx512(const Problem& p, const float* x, int rows, float* t);
// The tile's output with the low-rank sum taken from lowrank [mr][PANEL] when given (else computed).
TARGET_AVX512 void write_tile_avx512(const Problem& p, const ActPanel& a, const float* f, const float* lowrank,
                                     int64_t n0, int ncols, float* y, int64_t ldy);
TARGET_AVX512 void stream_tile_avx512(const float* tile, int rows, float* y, int64_t ldy);
// Adds gs[g][c] * (acc[r][c] - sumx[g][r]) to f[r][c] for rows r < a.mr, all PANEL columns.
TARGET_AVX512 void flush_group_avx512(const ActPanel& a, const int32_t* acc, const float* gs, int64_t g, float* f);
}  // namespace x86
#endif

// n (1..64) bits of a packed row starting at bit `start`, never reading past row_bytes.
static inline uint64_t read_bits(const uint8_t* row, int64_t row_bytes, int64_t start, int n) {
  const int64_t b = start >> 3;
  const int s = (int)(start & 7);
  const int64_t avail = row_bytes - b;
  uint64_t v = 0;
  if (avail >= 8) {
    memcpy(&v, row + b, 8);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    v = __builtin_bswap64(v);
#endif
  } else {
    for (int64_t i = 0; i < avail; ++i) v |= (uint64_t)row[b + i] << (8 * i);
  }
  v >>= s;
  if (s && n > 64 - s && avail > 8) v |= (uint64_t)row[b + 8] << (64 - s);
  return n == 64 ? v : v & ((1ull << n) - 1);
}

// Valid (unpadded) columns of group g.
static inline int64_t group_len(const Problem& p, int64_t g) {
  return p.K - g * p.gsize < p.gsize ? p.K - g * p.gsize : p.gsize;
}

// Calls fn(kp, k, nb, nvalid) for consecutive chunks of at most `width` padded columns that never
// straddle a group, from padded column kp0 up to kp1 (chunk boundaries): padded positions kp .. kp +
// nb - 1 hold real columns k .. k + nvalid - 1, then 0.
template <typename Fn>
static inline void for_each_chunk(const Problem& p, int width, int64_t kp0, int64_t kp1, Fn fn) {
  for (int64_t g = kp0 / p.gpad; g < p.ngroups && g * p.gpad < kp1; ++g) {
    const int64_t valid = group_len(p, g);
    for (int64_t c = 0; c < p.gpad; c += width) {
      if (g * p.gpad + c < kp0) continue;
      if (g * p.gpad + c >= kp1) break;
      const int nb = (int)(p.gpad - c < width ? p.gpad - c : width);
      const int nvalid = c < valid ? (int)(valid - c < nb ? valid - c : nb) : 0;
      fn(g * p.gpad + c, g * p.gsize + c, nb, nvalid);
    }
  }
}

// Sign bits of weight row n, real columns k .. k + nvalid - 1 (0 for rows past N).
static inline uint64_t row_bits(const Problem& p, int64_t n, int64_t k, int nvalid) {
  return n < p.N && nvalid > 0 ? read_bits(p.signs + n * p.row_bytes, p.row_bytes, k, nvalid) : 0;
}

}  // namespace bonsai
