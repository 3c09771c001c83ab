// CPU 1-bit matmul: y[M, N] = x[M, K] @ W.T + bias,
// W = row_scale * group_scale * col_scale * B + row_offset + U @ V.
//
// Approach, chosen after measuring on a 2-core Xeon (AVX-512 + VNNI + AMX; torch fp32 110-300 GFLOP/s):
//  * Activations are quantized per token to int8 (absmax / 127, round half to even); col_scale is
//    folded into x first. Signs become bytes w in {0, 2}: since +-1 = w - 1,
//        sum_k (+-1) q_k = sum_k w_k q_k - sum_k q_k,
//    so the inner product is an unsigned-by-signed int8 dot product plus a per-row correction.
//    That maps onto one instruction per 64 multiply-adds with AVX-512 VNNI (vpdpbusd, measured
//    ~700 GOP/s per core peak vs ~210 GFLOP/s for fp32 FMA), onto vpmaddubsw + vpaddw with AVX2,
//    and onto AMX tiles (tdpbsud: 16 x 16 outputs x 64 k per instruction) where the CPU has them.
//    We chose this over T-MAC style lookup tables: with int8 tables the 4-column partial sums lose
//    precision (or need two shuffles for int16 tables), and the table build is per activation
//    tile; the dot-product form keeps exact integer sums and is simpler.
//  * Weights are read in the stored layout (no repacked copy, so weight memory stays at 1 bit):
//    each 32-row panel is expanded on the fly into bytes wbuf[k4][32][4] (the vpdpbusd lane layout:
//    32-bit lane = one output column, 4 consecutive k; 16 consecutive k4 rows of one 16-column half
//    are also an AMX B tile) by mask-to-byte moves plus a dword transpose. The expansion is done
//    once per panel and M-block and is amortized over the block's rows.
//  * Groups: K is cut into groups (each zero-padded to Ops::kunit columns); integer sums are
//    flushed to float once per group with the group scale, so any group size works.
//  * Epilogue in the same pass, while the output tile is in L1: row offset (times the row sum of
//    x), bias, and the low-rank residual in float32 (x @ V.T per row during quantization, then a
//    rank-r update of the tile), so a "mean + rank-16" layer is one call and one write of y.
//  * Blocking: activation rows in blocks of ~BLOCK_BYTES (stay in L2), 32-column weight panels in
//    L2/L1, register tiles of mr rows x 32 columns. A path with Ops::pass_steps (AMX) goes over K in
//    passes of that many k4 steps when there is one group, each over every tile, so that a block's
//    share of K (not all of K) has to stay in L2 and a block keeps ~320 rows at K = 12288; a
//    tile's int32 sums wait in its own part of y between passes. OpenMP threads take (M-block, panel) work items
//    from one contiguous range each, then from the back of the others' ranges; small products run
//    on fewer threads (waking a thread costs more than it saves).
//  * Paths: scalar (portable, reference for the others), AVX2+FMA, AVX-512 BW+VNNI, AMX-INT8 (x86,
//    chosen at run time from CPU features and OS permission), NEON (aarch64 only). Every path
//    quantizes identically.
#include "bitmm.h"

#include <math.h>
#include <stdlib.h>

#include <atomic>
#include <initializer_list>
#include <memory>
#include <new>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace bonsai {
namespace {

constexpr int64_t BLOCK_BYTES = 1 << 20;  // quantized activation rows per M-block (L2-sized)
constexpr int64_t KC_STEPS = 128;         // k4 steps per K-chunk: 16 KiB of expanded weights (L1)
constexpr int64_t WORK_PER_THREAD = 1 << 21;  // multiply-adds below which one more thread does not pay
constexpr int64_t AMX_MIN_ROWS = 16;      // fewer rows than one tile: the AVX-512 path is faster
constexpr size_t KEEP_WORKSPACE = 16 << 20;   // workspace bytes kept between calls (per calling thread)
// A layer whose expanded panels fit in this many bytes (L2) is expanded once per call and its
// items go row block by row block: each thread then writes whole rows of y, ROW_BLOCK rows at a
// time, instead of 32-column strips down all M rows (strided stores that miss the cache on every
// row: at K = 320, N = 1280, M = 512 the stores of y took more time than the products).
constexpr size_t SHARED_PANEL_BYTES = 1 << 19;
constexpr int64_t ROW_BLOCK = 32;
// Outputs of at least this many bytes are written with streaming stores where the path has them
// (Ops::stream_tile): they leave the caches before the next layer reads them, so caching them only
// costs a read of every line of y before it is written (4B's qkv and fc1 at M >= 1024: 1.12-1.27x
// alone, a 4B step ~7%). Smaller ones may still be in L3 when read; with 16 MiB here bonsai-emoji
// at batch 8 (fc1: 21 MB) measured 0-6% slower, within this machine's noise, so they are left out.
constexpr int64_t STREAM_BYTES = 32 << 20;

void quantize_row_scalar(const Problem& p, const float* x, int8_t* q, float* scale, float* xsum, int32_t* qsum) {
  float amax = 0.f, sum = 0.f;
  for (int64_t k = 0; k < p.K; ++k) {
    sum += x[k];
    const float v = p.col_scale ? x[k] * p.col_scale[k] : x[k];
    if (fabsf(v) > amax) amax = fabsf(v);
  }
  const float inv = amax > 0.f ? 127.f / amax : 0.f;
  *scale = amax / 127.f;
  *xsum = sum;
  int32_t s = 0;
  for (int64_t k = 0; k < p.K; ++k) {
    const float v = p.col_scale ? x[k] * p.col_scale[k] : x[k];
    float r = rintf(v * inv);
    r = r > 127.f ? 127.f : (r < -127.f ? -127.f : r);
    q[k] = (int8_t)r;
    s += q[k];
  }
  *qsum = s;
}

void expand_panel_scalar(const Problem& p, int64_t n0, int64_t j0, int64_t j1, uint8_t* w) {
  for_each_chunk(p, 64, j0 * 4, j1 * 4, [&](int64_t kp, int64_t k, int nb, int nvalid) {
    for (int i = 0; i < PANEL; ++i) {
      const uint64_t bits = row_bits(p, n0 + i, k, nvalid);
      for (int b = 0; b < nb; ++b)
        w[((kp + b) >> 2) * PANEL_BYTES + i * 4 + ((kp + b) & 3)] = (uint8_t)(((bits >> b) & 1) * 2);
    }
  });
}

void kernel_scalar(const Problem& p, const ActPanel& a, const uint8_t* w, Tile t, int64_t j0,
                   int64_t j1, int ncols) {
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
          f += t.gs[g * PANEL + c] * (float)(acc - a.sumx[g * a.mr + r]);
          acc = 0;
        }
      }
      t.acc[r * PANEL + c] = acc;
    }
  }
}

const Ops SCALAR_OPS = {4, 4, quantize_row_scalar, lowrank_row_scalar, expand_panel_scalar, kernel_scalar,
                        write_tile_scalar, prologue_row_scalar, epilogue_tile_scalar, epilogue_norms_scalar, nullptr, nullptr};

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
    case ISA_AVX_VNNI: return x86_has(ISA_AVX_VNNI) ? avx_vnni_ops() : nullptr;
    case ISA_AVX512: return x86_has(ISA_AVX512) ? avx512_ops() : nullptr;
    case ISA_NEON: return neon_ops();  // NEON is part of every AArch64 CPU
    case ISA_AMX: return amx_ops();
    default: return nullptr;
  }
}

// Quantize row m (after the fused prologue, if any, into xrow) and place it in its panel:
// q[kpad / kunit][mr][kunit] with group padding, plus group sums and (when lowrank) the row's
// low-rank factor x @ V.T.
void place_row(const Problem& p, const Ops& ops, int64_t m, int8_t* qall, int32_t* sumx_all,
               float* scale, float* xsum, float* lrt, float* xrow, int8_t* qrow, int8_t* padded, bool lowrank) {
  const int MR = ops.mr, KU = ops.kunit;
  const int64_t mp = m / MR;
  const int r = (int)(m % MR);
  const int mr = (int)(p.M - mp * MR < MR ? p.M - mp * MR : MR);
  const float* x = p.x + m * p.K;
  if (p.fusion && p.fusion->layer_norm) {
    ops.prologue_row(p, m, x, xrow);
    x = xrow;
  }
  int32_t qsum;
  ops.quantize_row(p, x, qrow, &scale[m], &xsum[m], &qsum);
  if (lowrank) ops.lowrank_row(p, x, lrt + m * p.rank_pad);
  int32_t* sumx = sumx_all + mp * MR * p.ngroups;
  for (int64_t g = 0; g < p.ngroups; ++g) {
    const int64_t start = g * p.gsize, len = p.K - start < p.gsize ? p.K - start : p.gsize;
    int32_t s = p.ngroups == 1 ? qsum : 0;  // one group: its sum is the row's
    for (int64_t c = 0; p.ngroups > 1 && c < len; ++c) s += qrow[start + c];
    memcpy(padded + g * p.gpad, qrow + start, (size_t)len);
    memset(padded + g * p.gpad + len, 0, (size_t)(p.gpad - len));
    sumx[g * mr + r] = s;
  }
  int8_t* base = qall + mp * MR * p.kpad + r * KU;
  for (int64_t j = 0; j < p.kpad / KU; ++j) memcpy(base + j * mr * KU, padded + j * KU, (size_t)KU);
}

// Asks for the sign bits of k4 steps j0 .. j1 - 1 of the panel at n0 to be brought into L2 while the
// current item runs: the expansion reads them 8 bytes per row at a time, a pattern the hardware
// prefetchers miss, and waited on L3 for most of its time. (Padded columns are ignored: the bytes
// past a group's end are the next group's, so nothing is missed for long.)
void prefetch_panel(const Problem& p, int64_t n0, int64_t j0, int64_t j1) {
#if defined(__GNUC__) || defined(__clang__)
  const int64_t rows = p.N - n0 < PANEL ? p.N - n0 : PANEL;
  const int64_t b0 = j0 * 4 / 8, b1 = (j1 * 4 + 7) / 8 < p.row_bytes ? (j1 * 4 + 7) / 8 : p.row_bytes;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t b = b0 & ~63; b < b1; b += 64) __builtin_prefetch(p.signs + (n0 + r) * p.row_bytes + b, 0, 2);
#else
  (void)p, (void)n0, (void)j0, (void)j1;
#endif
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

// Scratch memory of one call, kept between calls of the same thread up to KEEP_WORKSPACE bytes
// (allocating and page-faulting it on every call cost more than small products take).
class Workspace {
 public:
  ~Workspace() { release(buf_); }
  void* get(size_t bytes) {
    if (bytes > size_) {
      release(buf_);
      buf_ = aligned(bytes);
      size_ = buf_ ? bytes : 0;
    }
    return buf_;
  }
  void trim() {
    if (size_ > KEEP_WORKSPACE) {
      release(buf_);
      buf_ = nullptr;
      size_ = 0;
    }
  }

 private:
  void* buf_ = nullptr;
  size_t size_ = 0;
};

// Contiguous range [front, back) of work items, owned by one thread that takes items from the
// front; a thread done with its own range takes items from the back of the others'.
class alignas(64) WorkRange {
 public:
  void reset(int64_t front, int64_t back) { v_.store(pack(front, back), std::memory_order_relaxed); }
  int64_t take_front() {
    uint64_t v = v_.load(std::memory_order_relaxed);
    while ((uint32_t)v < (uint32_t)(v >> 32))
      if (v_.compare_exchange_weak(v, v + 1, std::memory_order_relaxed)) return (int64_t)(uint32_t)v;
    return -1;
  }
  int64_t take_back() {
    uint64_t v = v_.load(std::memory_order_relaxed);
    while ((uint32_t)v < (uint32_t)(v >> 32))
      if (v_.compare_exchange_weak(v, v - (1ull << 32), std::memory_order_relaxed))
        return (int64_t)(v >> 32) - 1;
    return -1;
  }

 private:
  static uint64_t pack(int64_t front, int64_t back) { return (uint64_t)front | (uint64_t)back << 32; }
  std::atomic<uint64_t> v_{0};
};

// Carves 64-byte aligned pieces out of one buffer (first pass with base null: total size).
struct Carver {
  char* base;
  size_t used = 0;
  template <typename T>
  T* take(size_t count) {
    T* out = base ? (T*)(base + used) : nullptr;
    used += (sizeof(T) * count + 63) / 64 * 64;
    return out;
  }
};

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

// The weight of one layer as the binding passes it (built once per layer; see binding.py).
struct BonsaiWeight {
  const uint8_t* signs;          // [N, ceil(K / 8)]
  int64_t N, K;
  const float* row_scale;        // [N]
  int64_t group_size;            // 0: no group scales
  const uint16_t* group_scale;   // float16 bits [N, ceil(K / group_size)] or null
  const float* col_scale;        // [K] or null
  const float* row_offset;       // [N] or null
  int64_t rank;                  // 0: no low-rank residual
  const float* lowrank_v;        // [rank, K] float32
  const uint16_t* lowrank_ub;    // U in tiles (Problem::lowrank_ub)
  const uint16_t* lowrank_vb;    // V in tiles (Problem::lowrank_vb)
};

BONSAI_API int bonsai_bitmm_has_isa(int isa) { return ops_for(isa) != nullptr; }

BONSAI_API int bonsai_bitmm_best_isa(void) {
  for (int isa : {ISA_AMX, ISA_AVX512, ISA_AVX_VNNI, ISA_AVX2, ISA_NEON})
    if (ops_for(isa)) return isa;
  return ISA_SCALAR;
}

// y[M, N] = epilogue(prologue(x[M, K]) @ W.T + bias) (bias [N] or null; fusion null: no prologue
// or epilogue). Returns 0 on success, 1 if `isa` cannot run here, 2 if out of memory, 3 on bad
// sizes. The AMX path hands products of fewer than 16 rows to the AVX-512 path.
BONSAI_API int bonsai_bitmm(int isa, int nthreads, const BonsaiWeight* wt, const float* x, int64_t M,
                            const float* bias, float* y, const Fusion* fusion) {
  const int64_t K = wt->K, N = wt->N, group_size = wt->group_size;
  if (M < 0 || K <= 0 || N < 0 || group_size < 0 || (group_size > 0) != (wt->group_scale != nullptr) ||
      wt->rank < 0 || (wt->rank > 0 && (!wt->lowrank_v || !wt->lowrank_ub)))
    return 3;
  if (fusion && (fusion->rows_per_sample < 1 || (!fusion->shift != !fusion->scale) ||
                 (fusion->shift && !fusion->layer_norm) || fusion->norm_cols < 0 ||
                 fusion->norm_cols > N ||
                 (fusion->norm_cols && (fusion->norm_dim < 1 || fusion->norm_groups < 1 || !fusion->norm_weight ||
                                        fusion->norm_cols % (fusion->norm_dim * fusion->norm_groups))) ||
                 (fusion->gate && !fusion->residual)))
    return 3;
  const Ops* ops = ops_for(isa);
  if (!ops) return 1;
  if (isa == ISA_AMX && M < AMX_MIN_ROWS) ops = avx512_ops();
  Problem p = {x, M, K, N, wt->signs, (K + 7) / 8, wt->row_scale, wt->group_scale, wt->col_scale, wt->row_offset,
               wt->rank, (wt->rank + 15) / 16 * 16, wt->lowrank_v, wt->lowrank_ub, wt->lowrank_vb, bias, y, fusion,
               0, 0, 0, 0};
  const int KU = ops->kunit;
  p.gsize = group_size > 0 && group_size < K ? group_size : K;
  p.gpad = (p.gsize + KU - 1) / KU * KU;
  p.ngroups = (K + p.gsize - 1) / p.gsize;
  p.kpad = p.ngroups * p.gpad;
  if (M == 0 || N == 0) return 0;
  const int64_t work = M * N * K / WORK_PER_THREAD + 1;
#ifdef _OPENMP
  const int nt = (int)(nthreads < 1 ? 1 : (nthreads < work ? nthreads : work));
#else
  const int nt = 1;
  (void)nthreads;
  (void)work;
#endif
  const int MR = ops->mr;
  const int64_t npm = (M + MR - 1) / MR, npn = (N + PANEL - 1) / PANEL;
  const int64_t k4 = p.kpad / 4;
  const size_t row_tmp = (size_t)(p.K + p.kpad + 64), wbytes = (size_t)(k4 * PANEL_BYTES);
  const bool shared = wbytes * (size_t)npn <= SHARED_PANEL_BYTES;
  const bool direct = ops->direct_single_group && p.ngroups == 1;
  // Passes over K (Ops::pass_steps): `span` k4 steps of every tile per pass, one kernel call each.
  const bool passes = direct && !shared && ops->pass_steps > 0;
  const int64_t span = passes && ops->pass_steps < k4 ? ops->pass_steps : k4;
  const int64_t npass = (k4 + span - 1) / span;
  const int64_t kc = passes ? span : KC_STEPS;  // k4 steps per kernel call
  int64_t mc = shared ? (ROW_BLOCK + MR - 1) / MR : BLOCK_BYTES / (MR * 4 * span);  // activation panels per M-block
  mc = mc < 1 ? 1 : (mc > npm ? npm : mc);
  const int64_t nbm = (npm + mc - 1) / mc;
  const int64_t panel_sets = shared ? npn : nt;  // expanded panels (and their scales) held at once
  const size_t gsn = (size_t)(p.ngroups * PANEL), tile_n = (size_t)(mc * MR * PANEL);
  // One buffer: quantized rows (plus a tile of slack: AMX loads whole 16-row tiles), per-row sums,
  // scales and low-rank factors, and per-thread panel and tile scratch.
  const bool bf16_rows = p.rank && ops->lowrank_bf16;
  // Head norms read finished rows back, so their outputs stay in the cache; so do outputs that held
  // the sums between passes (their lines are in the cache already).
  const bool stream = ops->stream_tile && M * N * 4 >= STREAM_BYTES && N % 16 == 0 && (uintptr_t)y % 64 == 0 &&
                      !(fusion && fusion->norm_cols) && npass == 1;
  uint16_t* lrb;
  int8_t *q, *rows;
  int32_t *sumx, *accall, *carry_edge;
  float *scale, *gsall, *fall, *xrows, *sball;
  uint8_t* wall;
  auto carve = [&](char* base) {  // with base null: only the size
    Carver c = {base};
    q = c.take<int8_t>((size_t)(npm * MR * p.kpad + MR * 64));
    sumx = c.take<int32_t>((size_t)(npm * MR * p.ngroups));
    scale = c.take<float>((size_t)M * (2 + p.rank_pad));  // scale, xsum, low-rank factors
    lrb = c.take<uint16_t>(bf16_rows ? (size_t)((npm * MR + 16) * lowrank_bf16_stride(p)) : 0);  // + a tile's slack
    rows = c.take<int8_t>(row_tmp * nt);
    xrows = c.take<float>((size_t)(fusion ? K * LOWRANK_ROWS : 0) * nt);  // prologue output rows
    wall = c.take<uint8_t>(wbytes * panel_sets);
    gsall = c.take<float>(gsn * panel_sets);
    accall = c.take<int32_t>(tile_n * nt);
    fall = c.take<float>(tile_n * nt);
    carry_edge = c.take<int32_t>(npass > 1 ? (size_t)((npn + npm) * MR * PANEL) : 0);
    sball = c.take<float>(stream ? (size_t)(MR * PANEL * nt) : 0);
    return c.used;
  };
  static thread_local Workspace workspace;
  char* base = (char*)workspace.get(carve(nullptr));
  if (!base) return 2;
  carve(base);
  float* xsum = scale + M;
  float* lrt = scale + 2 * M;
  const int64_t items = nbm * npn;
  if (items > (int64_t)UINT32_MAX) return 3;  // WorkRange packs item indices into 32 bits
  std::unique_ptr<WorkRange[]> ranges(new (std::nothrow) WorkRange[nt]);
  if (!ranges) return 2;
  for (int i = 0; i < nt; ++i) ranges[i].reset(items * i / nt, items * (i + 1) / nt);
  // The low-rank factors of LOWRANK_ROWS rows at a time (raw rows, or the prologue's output rows).
  const bool block_lowrank = p.rank && ops->lowrank_rows;
  const bool prologue = fusion && fusion->layer_norm;
  const bool epilogue_tile = fusion && (fusion->gelu || (fusion->residual && !fusion->norm_cols));
  const float* row_scale = p.row_scale;
  const uint16_t* group_scale = p.group_scale;

#pragma omp parallel num_threads(nt)
  {
#ifdef _OPENMP
    const int t = omp_get_thread_num();
#else
    const int t = 0;
#endif
    int8_t* qrow = rows + row_tmp * t;
    float* xblock = xrows + (fusion ? K * LOWRANK_ROWS : 0) * t;
    if (ops->thread_begin) ops->thread_begin();
#pragma omp for schedule(static)
    for (int64_t m0 = 0; m0 < M; m0 += LOWRANK_ROWS) {
      const int rows = (int)(M - m0 < LOWRANK_ROWS ? M - m0 : LOWRANK_ROWS);
      for (int64_t m = m0; m < m0 + rows; ++m)
        place_row(p, *ops, m, q, sumx, scale, xsum, lrt, xblock + (m - m0) * K, qrow, qrow + p.K,
                  p.rank && !block_lowrank);
      if (block_lowrank) ops->lowrank_rows(p, prologue ? xblock : x + m0 * K, rows, lrt + m0 * p.rank_pad);
      for (int64_t m = m0; bf16_rows && m < m0 + rows; ++m)
        for (int64_t j = 0; j < lowrank_bf16_stride(p); ++j)
          lrb[m * lowrank_bf16_stride(p) + j] = j < p.rank ? bf16_bits(lrt[m * p.rank_pad + j]) : 0;
    }

    // k4 steps j0 .. j1 - 1 of panel n0 / PANEL expanded into w, with its columns' scales in gs.
    auto prepare_panel = [&](int64_t n0, int64_t j0, int64_t j1, uint8_t* w, float* gs) {
      const int ncols = (int)(N - n0 < PANEL ? N - n0 : PANEL);
      ops->expand_panel(p, n0, j0, j1, w);
      for (int c = 0; c < PANEL; ++c) {
        const int64_t n = n0 + c;
        for (int64_t g = 0; g < p.ngroups; ++g) {
          const float gscale = group_scale && c < ncols ? half_to_float(group_scale[n * p.ngroups + g]) : 1.f;
          gs[g * PANEL + c] = c < ncols ? row_scale[n] * gscale : 0.f;
        }
      }
    };
    if (shared) {
#pragma omp for schedule(static)
      for (int64_t j = 0; j < npn; ++j) prepare_panel(j * PANEL, 0, k4, wall + wbytes * j, gsall + gsn * j);
    }
    int32_t* acc = accall + tile_n * t;
    float* f = fall + tile_n * t;
    float* sbuf = sball + MR * PANEL * t;  // a whole tile on its way to y, when streamed
    // Item `it` of pass `pass`: the pass's k4 steps of one panel for the rows of one M-block.
    auto item = [&](int64_t it, int64_t pass) {
      const int64_t bm = it / npn, n0 = (it % npn) * PANEL;
      const int64_t jp0 = pass * span, jp1 = jp0 + span < k4 ? jp0 + span : k4;
      const int ncols = (int)(N - n0 < PANEL ? N - n0 : PANEL);
      const int64_t set = shared ? it % npn : t;
      uint8_t* w = wall + wbytes * set;
      float* gs = gsall + gsn * set;
      if (!shared) {
        prefetch_panel(p, (it + 1) % npn * PANEL, jp0, jp1);
        prepare_panel(n0, jp0, jp1, w, gs);
      }
      const int64_t mp0 = bm * mc, mp1 = (bm + 1) * mc < npm ? (bm + 1) * mc : npm;
      // K-chunks outside, activation panels inside: the weight chunk stays in L1. With one K-chunk
      // every panel is finished before the next starts, so they share one tile's scratch (in L1).
      for (int64_t j0 = jp0; j0 < jp1; j0 += kc) {
        const int64_t j1 = j0 + kc < jp1 ? j0 + kc : jp1;
        for (int64_t mp = mp0; mp < mp1; ++mp) {
          const int64_t m0 = mp * MR, slot = (jp1 - jp0 <= kc ? 0 : mp - mp0) * MR * PANEL;
          const ActPanel a = {q + m0 * p.kpad, sumx + m0 * p.ngroups, scale + m0, xsum + m0,
                              lrt + m0 * p.rank_pad, (int)(M - m0 < MR ? M - m0 : MR),
                              bf16_rows ? lrb + m0 * lowrank_bf16_stride(p) : nullptr};
          // Between passes a whole tile's sums wait in its own part of y (int32, overwritten by the
          // last pass); a tile at the bottom or right edge would spill past it, so its sums wait in
          // carry_edge (per panel for the last rows, per activation panel for the last columns).
          const bool whole = a.mr == MR && ncols == PANEL;
          int32_t* carry = npass == 1 ? nullptr
                           : whole   ? (int32_t*)(y + m0 * N + n0)
                                     : carry_edge + (a.mr < MR ? n0 / PANEL : npn + mp) * MR * PANEL;
          const Tile tile = {acc + slot, f + slot, n0, gs, carry, whole ? N * 4 : PANEL * 4};
          if (j0 == 0 && !direct) memset(tile.f, 0, sizeof(float) * (size_t)(MR * PANEL));
          ops->kernel(p, a, w, tile, j0, j1, ncols);
          if (j1 == k4) {
            const bool streamed = stream && ncols == PANEL;  // the tile and its epilogue in sbuf, then to y
            float* out = streamed ? sbuf : y + m0 * N + n0;
            const int64_t ldo = streamed ? PANEL : N;
            ops->write_tile(p, a, tile, ncols, out, ldo);
            if (epilogue_tile) ops->epilogue_tile(p, m0, a.mr, n0, ncols, out, ldo);
            if (streamed) ops->stream_tile(sbuf, a.mr, y + m0 * N + n0, N);
          }
        }
      }
    };
    // Each thread works through its own contiguous range of (M-block, panel) items, then takes
    // items from the back of the others' ranges. Contiguous ranges keep each thread on its own
    // part of y: handing out single panels (schedule(dynamic)) interleaved the threads' 32-column
    // strips of every y row and the two cores fought over y's cache lines (K = 320, N = 1280,
    // M = 512: 1.26x from the second thread, now 1.55-1.65x). Taking from the back still
    // balances threads that run at different speeds (measured: the calling thread is often the
    // slower one). A team smaller than nt is fine: the others' ranges are taken from the back.
    for (int64_t pass = 0; pass < npass; ++pass) {
      if (pass > 0) {  // every tile's sums of the last pass are in place before any item goes on
#pragma omp barrier
#pragma omp single
        for (int i = 0; i < nt; ++i) ranges[i].reset(items * i / nt, items * (i + 1) / nt);
      }
      for (int64_t it; (it = ranges[t].take_front()) >= 0;) item(it, pass);
      for (int o = 1; o < nt; ++o)
        for (int64_t it; (it = ranges[(t + o) % nt].take_back()) >= 0;) item(it, pass);
    }
    if (ops->thread_end) ops->thread_end();
    // Streaming stores are weakly ordered: a full fence (x86: a locked instruction or mfence) drains them.
    if (stream) std::atomic_thread_fence(std::memory_order_seq_cst);
    if (fusion && fusion->norm_cols) {
#pragma omp barrier
#pragma omp for schedule(static)
      for (int64_t m = 0; m < M; ++m) ops->epilogue_norms(p, m, y + m * N);
    }
  }
  workspace.trim();
  return 0;
}

}  // extern "C"
