// CPU kernel: KV-cache decode attention (contiguous or paged cache, GQA-packed, split-KV).
//
// Work item: one (batch, split): a range of tokens of one sequence across ALL kv heads. In the
// (.., token, heads_kv, head_dim) layout a token's K (or V) for every head is one contiguous
// run (2 KiB for 8 x 128 bf16), so an item streams whole contiguous blocks of the cache (a page
// or 16 tokens at a time) instead of 256-byte runs 2 KiB apart, which is what lets one core
// approach DRAM bandwidth. For each kv head the rows are all seqlen_q x group query heads that
// share it, so each cache element is read from memory once per call (GQA packing).
// Keys stream in tiles of kTile tokens: the tile's token offsets are looked up once (page table
// hoisted out of every inner loop) and shared by every head. In the generic path, rows that are
// neither fp32 nor read in place are converted once into an fp32 tile in L1, which the scores
// (SIMD dot products), the online softmax of csrc/core (SoftmaxStats, vector exp) and the P.V
// accumulation (fp32) then reuse. Read in place instead: fp16 and bf16 rows of whole vectors,
// converted as loaded (fp16 1.45x at the AVX2 level, bf16 1.3x at the baseline level, one
// thread), except that at the AVX2 level bf16 rows of whole 16-dim groups are split into even and
// odd dims by a mask and a shift (kRawBF16: 1.6x in L2, 1.75x from DRAM at two threads). The
// generic path walks a head's rows a tile at a time (256-512-byte runs a token apart), which the
// hardware prefetchers follow poorly, so the next tile's rows are prefetched in memory order
// (TilePrefetcher) over the dot products and the P.V loop: from DRAM at the AVX2 level, 1.2x
// (fp32) to 1.4x (bf16) at two threads, at the cost of ~20% when the cache is already in L2. It
// takes a head's rows in pairs, so that each key and value vector loaded feeds two rows (the
// loop was load-bound): +26% fp32, +15% bf16 from DRAM at the AVX2 level.
// Traffic: the visible part of K and V once, q and out once. Split-KV (batch smaller than the
// thread count, or not a multiple of it) writes fp32 partials (normalised output + log-sum-exp)
// that a second pass combines with the merge op's row merge (cpu/kernels/merge_row.h). OpenMP
// over the work items; compiled once per ISA level.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <fstream>
#include <numeric>
#include <string>
#include <type_traits>
#include <vector>
#include "core/decode_params.h"
#include "core/softmax_state.h"
#include "cpu/aligned.h"
#include "cpu/kernels.h"
#include "cpu/kernels/merge_row.h"
#include "cpu/simd.h"

namespace gk::cpu::GK_CPU_ISA_NS {

namespace {

constexpr int kTile = 16;   // keys per tile of the generic work item
// keys per tile of the AVX-512 work item: one softmax update per row per 32 keys. (Measured,
// interleaved both orders from DRAM: 64 reads contiguous caches 2-3% faster at 45-50 GB/s and
// ~5% at 70-80, paged ones 1-3% slower, 128 paged 3-6% slower. 64 for contiguous caches only
// would make paged and contiguous caches disagree in the last bits: not taken.)
constexpr int kTileA = 32;
constexpr int W = VecF::kWidth;

// x[i] = exp(x[i]) for kTile scores minus their maximum (<= 0, -inf or NaN), with the SIMD exp
// of cpu/simd.h: exp(-inf) = 0 exactly (masked keys weigh nothing), NaN stays NaN.
inline void exp_tile(float* x) {
  for (int j = 0; j < kTile; j += W) vexp_nonpos(VecF::load(x + j)).store(x + j);
}

// Token index within a tile, as floats (masks compare it with the visible range).
alignas(64) constexpr float kTileIndex[kTile] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};

inline float max_tile(const float* x) {
#if defined(GK_SIMD_AVX512)
  return _mm512_reduce_max_ps(_mm512_loadu_ps(x));
#else
  float m = x[0];
  for (int j = 1; j < kTile; ++j) m = x[j] > m ? x[j] : m;
  return m;
#endif
}

inline float sum_tile(const float* x) {
  float s = 0.f;
  for (int j = 0; j < kTile; j += W) s += reduce_add(VecF::load(x + j));
  return s;
}

// Converts n elements to fp32, zero-padding to `padded` (a multiple of W).
template <class T>
inline void load_row_f32(const T* src, float* dst, int64_t n, int64_t padded) {
  int64_t d = 0;
  for (; d + W <= n; d += W) VecF::load(src + d).store(dst + d);
  for (; d < n; ++d) dst[d] = to_float(src[d]);
  for (; d < padded; ++d) dst[d] = 0.f;
}

// Per-thread scratch, allocated once per call and reused across work items. The buffers that
// SIMD code walks a vector at a time start on a cache line (their rows are whole vectors): with
// std::vector's 16-byte alignment every 64-byte access of the accumulators straddled two lines,
// or not, depending on where malloc put them.
struct Scratch {
  AlignedVector<float> q, acc, scores, kbuf, vbuf;
  AlignedVector<bf16_t> qb;  // bf16 query rows (AVX-512 path)
  std::vector<SoftmaxStats> stats;
  std::vector<int64_t> lo, hi;
  std::vector<int64_t> koff, voff;  // token offsets (head 0) of a tile, the next one and the one after (TileOffsets)
  // AVX-512 path: rows on lanes (visible ranges, running max / sum, rescale factors)
  AlignedVector<int32_t> lo32, hi32;
  AlignedVector<float> m, l, alpha;
  AlignedVector<uint32_t> pairs;  // bf16 probabilities of a tile in token pairs (bf16 caches)
  std::vector<int64_t> row_koff;  // offset of each row's kv head in the key cache
  // Sizes the buffers for `rows` query rows (rounded up to whole 16-lane vectors) of `dp` padded
  // dims; keeps their memory across calls.
  void reserve(int64_t rows, int64_t dp) {
    rows = (rows + 15) / 16 * 16;
    q.resize(rows * dp), acc.resize(rows * dp), scores.resize(rows * kTileA), kbuf.resize(kTile * dp);
    vbuf.resize(kTile * dp), qb.resize(rows * dp), stats.resize(rows), lo.resize(rows), hi.resize(rows);
    koff.resize(3 * kTileA), voff.resize(3 * kTileA);
    lo32.resize(rows), hi32.resize(rows), m.resize(rows), l.resize(rows), alpha.resize(rows), row_koff.resize(rows);
    pairs.resize(rows * (kTileA / 2));
  }
};

// One scratch per OS thread, reused by every call: no allocation on the per-token path.
Scratch& thread_scratch(int64_t rows, int64_t dp) {
  static thread_local Scratch sc;
  sc.reserve(rows, dp);
  return sc;
}

// Prefetches the (token, kv head) rows of a list of tokens, `per_step` cache lines per call of
// step(), in memory order (token by token, heads in order), so that the prefetches spread
// evenly over the loop that calls it. When the heads of a token are adjacent (the usual layout)
// a token's heads are one run. A pointer walks the current row; the next row's address is
// computed only when it ends. (Recomputing every line's address from its token, head and line
// was ~20% of the AVX-512 kernel's time with the cache in L2. Walking: AVX2 level +15-20% in L2
// and +8-40% from DRAM; AVX-512 bf16 +0-15% from DRAM, fp32 +2-9% while the machine's bandwidth
// was high and -4-7% while it was low, in interleaved runs at two threads.) kLocality is
// __builtin_prefetch's: 3 = PREFETCHT0 (into L1), 2 = PREFETCHT1 (into L2) on x86.
// The loop costs ~7 instructions a line: about half of the AVX-512 work item's K and V loops at
// 4 lines a step (GQA groups of 4). A step of exactly 4 lines as straight-line code with one
// end-of-row check (the same lines, ~half the instructions) is faster while the cache is on chip
// and slower from DRAM, where it matters: interleaved, both orders, one thread in L2 fp32 +10%,
// paged fp32 +30%; two threads in L3 +8% / +30%; two threads from DRAM (sum 44-59 GB/s)
// contiguous -2..-12%, paged -13..-28%. One line before each token's FMAs instead (spread over
// the step, no loop): L2 and L3 within 3%, DRAM within the A/B position effect. Kept the loop.
template <int kLocality>
struct RowPrefetcher {
  const char* base = nullptr;
  const int64_t* token_off = nullptr;  // elements, head 0
  int64_t esize = 0, tokens = 0, heads = 0, head_stride = 0, row_bytes = 0, per_step = 0;  // sizes in bytes
  int64_t token = 0, head = 0;
  const char* cur = nullptr;      // next line to prefetch
  const char* row_end = nullptr;  // end of the current row, rounded up to whole lines

  RowPrefetcher() = default;  // issues nothing
  RowPrefetcher(const void* b, int64_t element_size, const int64_t* off, int64_t n, int64_t h, int64_t head_stride_elems,
                int64_t row_size, int64_t steps)
      : base(static_cast<const char*>(b)), token_off(off), esize(element_size), tokens(n), heads(h),
        head_stride(head_stride_elems * element_size), row_bytes((row_size + 63) / 64 * 64) {
    if (head_stride == row_size) heads = 1, row_bytes = (h * row_size + 63) / 64 * 64;  // dense heads: one run per token
    per_step = steps > 0 && n > 0 ? (n * heads * (row_bytes / 64) + steps - 1) / steps : 0;
    if (per_step) start_row();
  }
  GK_INLINE void step() {
    for (int64_t i = 0; i < per_step; ++i) {
      __builtin_prefetch(cur, 0, kLocality);
      cur += 64;
      if (cur == row_end) next_row();
    }
  }

 private:
  void start_row() {
    cur = base + token_off[token] * esize + head * head_stride;
    row_end = cur + row_bytes;
  }
  void next_row() {
    if (++head == heads) head = 0, ++token;
    if (token == tokens) per_step = 0;  // the tile is done: later steps issue nothing
    else start_row();
  }
};
using TilePrefetcher = RowPrefetcher<3>;

// Key and value rows as the generic work item reads them (KV): fp32 (in place, or converted into
// the tile buffers), fp16 and bf16 in place (converted as loaded), except that at the AVX2 level
// bf16 is read as each group of 2W dims' even and odd dims (load_bf16_even_odd). In that even /
// odd form the query rows and the accumulators hold each group of 2W dims as [W even dims][W odd
// dims] (to_even_odd / from_even_odd).
#if defined(GK_SIMD_AVX2)
constexpr bool kRawBF16 = true;
#else
constexpr bool kRawBF16 = false;
#endif
template <class KV>
constexpr bool kEvenOdd = kRawBF16 && std::is_same_v<KV, bf16_t>;
template <class KV>
constexpr int64_t kRowStep = kEvenOdd<KV> ? 2 * W : W;  // dims per load step

// Rows of n (a multiple of 2W) floats, each group of 2W dims to [even dims][odd dims], and back.
inline void to_even_odd(float* x, int64_t n) {
  float tmp[2 * W];
  for (int64_t d = 0; d < n; d += 2 * W) {
    for (int i = 0; i < W; ++i) tmp[i] = x[d + 2 * i], tmp[W + i] = x[d + 2 * i + 1];
    std::copy(tmp, tmp + 2 * W, x + d);
  }
}
inline void from_even_odd(float* x, int64_t n) {
  float tmp[2 * W];
  for (int64_t d = 0; d < n; d += 2 * W) {
    for (int i = 0; i < W; ++i) tmp[2 * i] = x[d + i], tmp[2 * i + 1] = x[d + W + i];
    std::copy(tmp, tmp + 2 * W, x + d);
  }
}

// Scores of 4 keys against NR (1 or 2) query rows q[r], written to out[r][0..3]: one load of a
// key vector feeds every row, 4 x NR independent accumulators; steps `pf` per load step.
template <int NR, class KV>
inline void dot4(const float* const* q, const KV* const* k, int64_t dp, float* const* out, TilePrefetcher& pf) {
  VecF a[NR][4];
  for (int r = 0; r < NR; ++r)
    for (int j = 0; j < 4; ++j) a[r][j] = VecF::zero();
  for (int64_t d = 0; d < dp; d += kRowStep<KV>) {
    pf.step();
    if constexpr (!kEvenOdd<KV>) {
      VecF x[NR];
      for (int r = 0; r < NR; ++r) x[r] = VecF::load(q[r] + d);
      for (int j = 0; j < 4; ++j) {
        const VecF kj = VecF::load(k[j] + d);
        for (int r = 0; r < NR; ++r) a[r][j] = fmadd(x[r], kj, a[r][j]);
      }
    } else {
#if defined(GK_SIMD_AVX2)
      VecF xe[NR], xo[NR];
      for (int r = 0; r < NR; ++r) xe[r] = VecF::load(q[r] + d), xo[r] = VecF::load(q[r] + d + W);
      for (int j = 0; j < 4; ++j) {
        VecF ke, ko;
        load_bf16_even_odd(k[j] + d, ke, ko);
        for (int r = 0; r < NR; ++r) a[r][j] = fmadd(xo[r], ko, fmadd(xe[r], ke, a[r][j]));
      }
#endif
    }
  }
  for (int r = 0; r < NR; ++r) reduce_add4(a[r], out[r]);
}

// Vectors c of the value row's dims [d, d + C * W) (C = 4, or one load step at the tail) as
// the accumulators lay them out: in order, or [even][odd] per 2W dims (kEvenOdd).
template <int C, class KV>
GK_INLINE void load_values(const KV* v, int64_t d, VecF (&x)[C]) {
  if constexpr (!kEvenOdd<KV>) {
    for (int c = 0; c < C; ++c) x[c] = VecF::load(v + d + c * W);
  } else {
#if defined(GK_SIMD_AVX2)
    for (int c = 0; c < C; c += 2) load_bf16_even_odd(v + d + c * W, x[c], x[c + 1]);
#endif
  }
}

// acc[r][d] += sum_j p[r][j] * v[j][d] over the tile for NR (1 or 2) rows: one load of a value
// vector feeds every row, register blocks of 4 vectors per row (then of one load step); steps
// `pf` per key of each block.
template <int NR, class KV>
inline void accumulate_pv(float* const* acc, const float* const* p, const KV* const* v, int nkeys, int64_t dp,
                          TilePrefetcher& pf) {
  auto block = [&](int64_t d, auto cw) {
    constexpr int C = decltype(cw)::value;
    VecF a[NR][C];
    for (int r = 0; r < NR; ++r)
      for (int c = 0; c < C; ++c) a[r][c] = VecF::load(acc[r] + d + c * W);
    for (int j = 0; j < nkeys; ++j) {
      pf.step();
      VecF w[NR], x[C];
      for (int r = 0; r < NR; ++r) w[r] = VecF::set1(p[r][j]);
      load_values<C>(v[j], d, x);
      for (int c = 0; c < C; ++c)
        for (int r = 0; r < NR; ++r) a[r][c] = fmadd(w[r], x[c], a[r][c]);
    }
    for (int r = 0; r < NR; ++r)
      for (int c = 0; c < C; ++c) a[r][c].store(acc[r] + d + c * W);
  };
  int64_t d = 0;
  for (; d + 4 * W <= dp; d += 4 * W) block(d, std::integral_constant<int, 4>{});
  for (; d < dp; d += kRowStep<KV>) block(d, std::integral_constant<int, int(kRowStep<KV> / W)>{});
}

template <class T>
void finish_rows(const DecodeParams& p, Scratch& sc, int64_t b, int split, int64_t dp);

// Query rows of sequence b for every kv head (row kvh * R + r, r = s * group + g): q in fp32 (or
// bf16 for the AVX-512 bf16 path), zeroed accumulators, fresh softmax states, visible ranges.
template <class T>
void init_rows(const DecodeParams& p, Scratch& sc, int64_t b, KeyRange split_keys, int64_t dp, bool bf16_q) {
  const int64_t D = p.head_dim, G = p.group(), R = p.seqlen_q * G, L = p.cache_seqlens[b];
  for (int64_t rr = 0; rr < p.heads_kv * R; ++rr) {
    const int64_t kvh = rr / R, r = rr % R, s = r / G, h = kvh * G + r % G;
    const T* qrow = static_cast<const T*>(p.q) + b * p.q_stride[0] + s * p.q_stride[1] + h * p.q_stride[2];
    if (bf16_q) {
      if constexpr (std::is_same_v<T, bf16_t>) std::copy(qrow, qrow + D, sc.qb.data() + rr * dp);
    } else {
      load_row_f32(qrow, sc.q.data() + rr * dp, D, dp);
    }
    std::fill_n(sc.acc.data() + rr * dp, dp, 0.f);
    sc.stats[rr] = SoftmaxStats{};
    const KeyRange kr = visible_keys(p, s, L);
    sc.lo[rr] = std::max(kr.lo, split_keys.lo), sc.hi[rr] = std::min(kr.hi, split_keys.hi);
  }
}

// One PREFETCHT2 per token row (all kv heads) of K and V for the n tokens at offsets koff / voff
// (elements, head 0): issued two tiles ahead, it takes the tile's TLB misses (a page walk per
// 4 KiB with the usual 4 KiB pages) a tile before the data prefetches that would otherwise wait
// for them. In interleaved runs of a standalone driver at 16k-64k tokens, AVX-512 work item:
// fp32 +3-4% at two threads and +9-14% at one, paged fp32 +1-4%, bf16 within the noise; generic
// work item at the AVX2 level, two threads: fp32 +7-15%, paged fp32 +18-23%, paged bf16 +9-23%.
inline void warm_translations(const DecodeParams& p, const int64_t* koff, const int64_t* voff, int64_t n, int64_t esize) {
  for (int64_t j = 0; j < n; ++j) {
    __builtin_prefetch(static_cast<const char*>(p.k) + koff[j] * esize, 0, 1);  // PREFETCHT2 on x86
    __builtin_prefetch(static_cast<const char*>(p.v) + voff[j] * esize, 0, 1);
  }
}

// Offsets (elements, head 0) of tokens [t, t + n) of sequence b in K and V, each token's K and V
// looked up once and shared by every head (none for n <= 0).
inline void lookup_offsets(const DecodeParams& p, int64_t b, int64_t t, int64_t n, int64_t* koff, int64_t* voff) {
  for (int64_t j = 0; j < n; ++j) cache_kv_offsets(p, b, t + j, koff[j], voff[j]);
}

// Tokens of a tile of `tile` keys starting at t within the split's keys: 0 past their end.
inline int tile_tokens(KeyRange keys, int64_t t, int tile) { return int(std::clamp<int64_t>(keys.hi - t, 0, tile)); }

// Token offsets (elements, head 0) of a split's tiles of `tile` keys, each token looked up once
// and shared by every head: the current tile's (k[0], v[0]), the next one's (the generic work
// item prefetches it during the current one, the AVX-512 one its first tokens) and the one
// after's (its TLB misses taken early by warm_translations).
// Buffers of kTileA entries in the scratch; step() moves them on by one tile.
struct TileOffsets {
  const DecodeParams& p;
  int64_t b;
  KeyRange keys;
  int tile;
  int64_t* k[3];
  int64_t* v[3];
  TileOffsets(const DecodeParams& params, Scratch& sc, int64_t seq, KeyRange split_keys, int tile_keys)
      : p(params), b(seq), keys(split_keys), tile(tile_keys),
        k{sc.koff.data(), sc.koff.data() + kTileA, sc.koff.data() + 2 * kTileA},
        v{sc.voff.data(), sc.voff.data() + kTileA, sc.voff.data() + 2 * kTileA} {
    lookup_offsets(p, b, keys.lo, tile_tokens(keys, keys.lo, tile), k[0], v[0]);
    lookup_offsets(p, b, keys.lo + tile, tile_tokens(keys, keys.lo + tile, tile), k[1], v[1]);
  }
  // At the tile starting at t0: looks up the tile after next and warms its translations.
  void warm_after_next(int64_t t0, int64_t esize) {
    const int n2 = tile_tokens(keys, t0 + 2 * tile, tile);
    lookup_offsets(p, b, t0 + 2 * tile, n2, k[2], v[2]);
    warm_translations(p, k[2], v[2], n2, esize);
  }
  void step() { std::rotate(k, k + 1, k + 3), std::rotate(v, v + 1, v + 3); }
};

#include "cpu/decode_attention_avx512.h"

// The generic work item (b, split), reading the cache rows as KV (see kRawBF16).
template <class T, class KV>
void decode_work_item_generic(const DecodeParams& p, Scratch& sc, int64_t b, int split, KeyRange split_keys) {
  const int64_t D = p.head_dim, dp = (D + W - 1) / W * W, G = p.group(), Sq = p.seqlen_q, R = Sq * G;
  const int64_t L = p.cache_seqlens[b];
  constexpr bool kRaw = kEvenOdd<KV>;  // bf16 rows read in place, as even / odd dims
  init_rows<T>(p, sc, b, split_keys, dp, false);
  if constexpr (kRaw)
    for (int64_t rr = 0; rr < p.heads_kv * R; ++rr) to_even_odd(sc.q.data() + rr * dp, dp);
  // fp32 caches with whole vectors (and raw bf16) are read in place; others go through the fp32
  // tile buffers
  const bool direct = std::is_same_v<KV, T> && D % kRowStep<KV> == 0;
  const KV* kptr[kTile];
  const KV* vptr[kTile];

  TileOffsets offs(p, sc, b, split_keys, kTile);
  const int64_t row_bytes = D * int64_t(sizeof(T)), esize = sizeof(T);
  const bool plain = p.softcap == 0.f && !p.alibi_slopes;  // scores are q.k * scale
  for (int64_t t0 = split_keys.lo; t0 < split_keys.hi; t0 += kTile) {
    int64_t* koff = offs.k[0];
    int64_t* voff = offs.v[0];
    const int nk = tile_tokens(split_keys, t0, kTile);
    for (int j = nk; j < kTile; ++j) koff[j] = koff[0], voff[j] = voff[0];  // masked padding: token t0
    offs.warm_after_next(t0, esize);
    // the next tile's rows, prefetched in memory order over this tile's dot products and P.V
    const int nn = tile_tokens(split_keys, t0 + kTile, kTile);
    const int64_t* knext = offs.k[1];
    const int64_t* vnext = offs.v[1];
    const int64_t rows = p.heads_kv * ((R + 1) / 2);  // dot / P.V passes: one per pair of rows
    constexpr int64_t step = kRowStep<KV>;
    TilePrefetcher kpf(p.k, esize, knext, nn, p.heads_kv, p.k_stride[2], row_bytes, rows * (kTile / 4) * (dp / step));
    TilePrefetcher vpf(p.v, esize, vnext, nn, p.heads_kv, p.v_stride[2], row_bytes,
                       rows * (dp / (4 * W) + dp % (4 * W) / step) * nk);
    for (int64_t kvh = 0; kvh < p.heads_kv; ++kvh) {
      const T* kbase = static_cast<const T*>(p.k) + kvh * p.k_stride[2];
      const T* vbase = static_cast<const T*>(p.v) + kvh * p.v_stride[2];
      for (int j = 0; j < kTile; ++j) {
        if (direct) {
          kptr[j] = reinterpret_cast<const KV*>(kbase + koff[j]), vptr[j] = reinterpret_cast<const KV*>(vbase + voff[j]);
        } else if constexpr (std::is_same_v<KV, float>) {
          if (j < nk) load_row_f32(kbase + koff[j], sc.kbuf.data() + j * dp, D, dp), load_row_f32(vbase + voff[j], sc.vbuf.data() + j * dp, D, dp);
          kptr[j] = sc.kbuf.data() + (j < nk ? j : 0) * dp, vptr[j] = sc.vbuf.data() + (j < nk ? j : 0) * dp;
        }
      }
      // The tile's scores -> probabilities for row rr (r within the head) and its softmax update;
      // false when the tile adds nothing to the row (every score -inf).
      auto softmax_row = [&](int64_t rr, int64_t r) {
        const int64_t lo = sc.lo[rr], hi = sc.hi[rr];
        float* srow = sc.scores.data() + rr * kTile;
        if (plain) {  // scale, and -inf outside the row's visible tokens [jlo, jhi) of the tile
          const VecF jlo = VecF::set1(float(std::clamp<int64_t>(lo - t0, 0, kTile)));
          const VecF jhi = VecF::set1(float(std::clamp<int64_t>(std::min<int64_t>(hi, t0 + nk) - t0, 0, kTile)));
          const VecF neg_inf = VecF::set1(-INFINITY), scale = VecF::set1(p.scale);
          for (int j = 0; j < kTile; j += W) {
            const VecF idx = VecF::load(kTileIndex + j);
            VecF x = VecF::load(srow + j) * scale;
            x = select_lt(idx, jlo, neg_inf, x);
            select_lt(idx, jhi, x, neg_inf).store(srow + j);
          }
        } else {
          const int64_t s = r / G, h = kvh * G + r % G;
          const float slope = p.alibi_slopes ? p.alibi_slopes[b * p.alibi_batch_stride + h] : 0.f;
          const int64_t pos = s + L - Sq;
          for (int j = 0; j < kTile; ++j) {
            const int64_t t = t0 + j;
            srow[j] = (t >= lo && t < hi && j < nk) ? decode_score(srow[j], p.scale, p.softcap, slope, pos - t) : -INFINITY;
          }
        }
        const float m_tile = max_tile(srow);
        if (m_tile == -INFINITY) return false;
        for (int j = 0; j < kTile; j += W) (VecF::load(srow + j) - VecF::set1(m_tile)).store(srow + j);
        exp_tile(srow);
        const MergeFactors f = sc.stats[rr].merge(m_tile, sum_tile(srow));
        float* acc = sc.acc.data() + rr * dp;
        if (f.self != 1.f)
          for (int64_t d = 0; d < dp; d += W) (VecF::load(acc + d) * VecF::set1(f.self)).store(acc + d);
        if (f.other != 1.f)
          for (int j = 0; j < kTile; j += W) (VecF::load(srow + j) * VecF::set1(f.other)).store(srow + j);
        return true;
      };
      auto visible = [&](int64_t rr) { return !(sc.hi[rr] <= t0 || sc.lo[rr] >= t0 + nk); };
      // Rows in pairs (GQA groups, several query tokens): each key and value vector loaded feeds
      // both rows of the pair.
      for (int64_t r = 0; r < R; r += 2) {
        const int64_t rr = kvh * R + r;
        const bool v0 = visible(rr), v1 = r + 1 < R && visible(rr + 1);
        if (!v0 && !v1) continue;  // no visible key of either row in the tile
        // the pair's rows that see the tile (r0 = the first of them), then those it adds to
        const int64_t r0 = v0 ? rr : rr + 1;
        const float* q[2] = {sc.q.data() + r0 * dp, sc.q.data() + (rr + 1) * dp};
        float* srow[2] = {sc.scores.data() + r0 * kTile, sc.scores.data() + (rr + 1) * kTile};
        for (int j = 0; j < kTile; j += 4) {
          float* out[2] = {srow[0] + j, srow[1] + j};
          if (v0 && v1) dot4<2>(q, kptr + j, dp, out, kpf);
          else dot4<1>(q, kptr + j, dp, out, kpf);
        }
        const bool c0 = v0 && softmax_row(rr, r), c1 = v1 && softmax_row(rr + 1, r + 1);
        const int64_t a0 = c0 ? rr : rr + 1;
        float* acc[2] = {sc.acc.data() + a0 * dp, sc.acc.data() + (rr + 1) * dp};
        const float* prob[2] = {sc.scores.data() + a0 * kTile, sc.scores.data() + (rr + 1) * kTile};
        if (c0 && c1) accumulate_pv<2>(acc, prob, vptr, nk, dp, vpf);
        else if (c0 || c1) accumulate_pv<1>(acc, prob, vptr, nk, dp, vpf);
      }
    }
    offs.step();
  }
  if constexpr (kRaw)
    for (int64_t rr = 0; rr < p.heads_kv * R; ++rr) from_even_odd(sc.acc.data() + rr * dp, dp);
  finish_rows<T>(p, sc, b, split, dp);
}

// far_tiles: the call's cache comes from DRAM (see decode_attention); the AVX-512 work item then
// also prefetches paged caches' next tile (NearFarPrefetcher).
template <class T>
void decode_work_item(const DecodeParams& p, Scratch& sc, int64_t b, int split, bool far_tiles) {
  const int64_t D = p.head_dim, dp = (D + W - 1) / W * W;
  const KeyRange split_keys = split_range(visible_keys_all_queries(p, p.cache_seqlens[b]), split, p.num_splits,
                                          p.paged() ? std::max<int64_t>(p.page_size, kTile) : kTile);
#if defined(GK_SIMD_AVX512)
  if (D % 32 == 0) {
    init_rows<T>(p, sc, b, split_keys, dp, std::is_same_v<T, bf16_t>);
    decode_work_item_avx512<T>(p, sc, b, split_keys, far_tiles);
    finish_rows<T>(p, sc, b, split, dp);
    return;
  }
#else
  (void)far_tiles;
#endif
  if constexpr (!std::is_same_v<T, float>)  // fp16 / bf16 rows read in place when whole load steps
    if (D % kRowStep<T> == 0) return decode_work_item_generic<T, T>(p, sc, b, split, split_keys);
  decode_work_item_generic<T, float>(p, sc, b, split, split_keys);
}

// Finish a work item: normalise and write the output, or the fp32 partial of this split.
template <class T>
void finish_rows(const DecodeParams& p, Scratch& sc, int64_t b, int split, int64_t dp) {
  const int64_t D = p.head_dim, G = p.group(), Sq = p.seqlen_q, R = Sq * G;
  for (int64_t rr = 0; rr < p.heads_kv * R; ++rr) {
    const int64_t kvh = rr / R, r = rr % R, s = r / G, h = kvh * G + r % G;
    const float inv = sc.stats[rr].inv_denominator();
    float* acc = sc.acc.data() + rr * dp;
    const int64_t row = (b * Sq + s) * p.heads_q + h;          // (batch, seqlen_q, heads_q)
    const int64_t lse_idx = (b * p.heads_q + h) * Sq + s;     // (batch, heads_q, seqlen_q)
    if (p.num_splits == 1) {
      T* out = static_cast<T*>(p.out) + row * D;
      int64_t d = 0;
      for (; d + W <= D; d += W) (VecF::load(acc + d) * VecF::set1(inv)).store(out + d);
      for (; d < D; ++d) out[d] = from_float<T>(acc[d] * inv);
      if (p.lse) p.lse[lse_idx] = sc.stats[rr].lse();  // (a logf: only when asked for)
    } else {
      const int64_t rows = p.batch * Sq * p.heads_q;
      float* out = p.partial_out + (split * rows + row) * D;
      for (int64_t d = 0; d < D; ++d) out[d] = acc[d] * inv;
      p.partial_lse[split * rows + lse_idx] = sc.stats[rr].lse();
    }
  }
}

}  // namespace

namespace {
// The largest CPU cache sysfs lists for cpu0 (the L3 of its core complex), 32 MiB if unknown.
// (sysconf(_SC_LEVEL3_CACHE_SIZE) reports 384 MiB on this machine's EPYC guest: the whole
// socket's L3, of which a core sees 32 MiB.)
int64_t last_level_cache_bytes() {
  static const int64_t bytes = [] {
    int64_t best = 0;
    for (int i = 0; i < 8; ++i) {
      std::ifstream f("/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(i) + "/size");
      int64_t n = 0;
      char unit = 0;
      if (!(f >> n)) continue;
      f >> unit;
      best = std::max(best, n << (unit == 'K' ? 10 : unit == 'M' ? 20 : unit == 'G' ? 30 : 0));
    }
    return best > 0 ? best : int64_t(32) << 20;
  }();
  return bytes;
}

// Whether a call that reads `bytes` of the cache at `cache` (K's base: a paged pool or a
// contiguous cache) finds them in DRAM rather than in the last-level cache. More than half the
// LLC cannot stay there beside anything else. A smaller cache is taken to be in the LLC only when
// the previous call read the same one (a loop over one layer's cache, as a naive benchmark
// runs): in a model, the previous call read another layer's cache, and that layer's weights
// have pushed this one out since. (Paged 16-bit caches of 1-4k tokens from DRAM, kernel on the
// pool against the same kernel on a contiguous copy, alternating calls: paged / contiguous time
// 1.10-1.11 -> 1.05-1.06 at 4k bf16, 2-4% at 1k, with the far stream this enables.)
bool reads_from_dram(const void* cache, int64_t bytes) {
  static std::atomic<const void*> last{nullptr};
  const void* previous = last.exchange(cache, std::memory_order_relaxed);
  return bytes > last_level_cache_bytes() / 2 || previous != cache;
}
}  // namespace

// Splits per sequence when the caller passes 0: none when the sequences already share out
// evenly over the threads. Otherwise, when the sequences have about the same length, the fewest
// splits that share the items (sequence x split) out evenly: each split starts with a tile whose
// loads nothing prefetched, and one split per thread measured 1-10% faster than four at batch 1
// (two threads, 1k-16k tokens). Mixed lengths take about four items per thread, so that the
// dynamic schedule can balance them. At least kMinSplitKeys keys per split (below that the
// partial traffic and the combine cost more than they balance).
int choose_num_splits(const DecodeParams& p, int num_threads) {
  constexpr int64_t kMinSplitKeys = 256;
  const int64_t items = p.batch, threads = num_threads;
  if (items >= threads && items % threads == 0) return 1;
  int64_t max_len = 0, min_len = INT64_MAX;  // of the visible keys
  for (int64_t b = 0; b < p.batch; ++b) {
    const KeyRange kr = visible_keys_all_queries(p, p.cache_seqlens[b]);
    max_len = std::max<int64_t>(max_len, kr.hi - kr.lo), min_len = std::min<int64_t>(min_len, kr.hi - kr.lo);
  }
  const bool even = max_len - min_len <= max_len / 8;
  const int64_t by_balance = even ? threads / std::gcd(items, threads) : (4 * threads + items - 1) / items;
  const int64_t by_length = std::max<int64_t>(1, max_len / kMinSplitKeys);
  return int(std::max<int64_t>(1, std::min<int64_t>({by_balance, by_length, 64})));
}

template <class T>
void decode_attention(const DecodeParams& params, int num_threads) {
  DecodeParams p = params;
  if (p.num_splits == 0) p.num_splits = choose_num_splits(p, num_threads);
  // split-KV partials: fp32 scratch owned by this call unless the caller passed a workspace
  AlignedVector<float> partial_out, partial_lse;
  if (p.num_splits > 1 && !p.partial_out) {
    const int64_t rows = p.batch * p.seqlen_q * p.heads_q;
    partial_out.resize(size_t(p.num_splits * rows * p.head_dim));
    partial_lse.resize(size_t(p.num_splits * rows));
    p.partial_out = partial_out.data(), p.partial_lse = partial_lse.data();
  }
  const int64_t items = p.batch * p.num_splits;
  const int64_t rows = p.heads_kv * p.seqlen_q * p.group(), dp = (p.head_dim + W - 1) / W * W;
  // Small problems (short caches) stay on the calling thread: waking the team costs more.
  int64_t keys = 0;  // visible keys of the call (a sliding window reads only its keys)
  for (int64_t b = 0; b < p.batch; ++b) {
    const KeyRange kr = visible_keys_all_queries(p, p.cache_seqlens[b]);
    keys += kr.hi - kr.lo;
  }
  const bool small = keys * rows * p.head_dim < (int64_t(1) << 16);
  // Only a cache read from DRAM pays for a second, far prefetch stream's instructions (paged
  // caches +3-10% from DRAM; -25-35% in L3).
  const bool far_tiles = reads_from_dram(p.k, keys * p.heads_kv * p.head_dim * int64_t(sizeof(T)) * 2);
  const int threads = small ? 1 : int(std::max<int64_t>(1, std::min<int64_t>(num_threads, items)));
  // Split-KV: the partials are combined row by row by the merge kernel's row merge
  // (merge_row.h), fp32 partials into the output dtype.
  const int64_t out_rows = p.batch * p.seqlen_q * p.heads_q;
  const MergeStatesParams mp = p.num_splits > 1 ? split_partials_as_merge_input(p) : MergeStatesParams{};
  auto combine = [&](int64_t row) {
    const int64_t h = row % p.heads_q, s = (row / p.heads_q) % p.seqlen_q, b = row / (p.heads_q * p.seqlen_q);
    float* lse = p.lse ? p.lse + (b * p.heads_q + h) * p.seqlen_q + s : nullptr;
    merge::merge_row<float, T>(mp, b, s, h, static_cast<T*>(p.out) + row * p.head_dim, lse);
  };
  if (threads == 1) {  // no OpenMP region at all: entering one costs about a microsecond
    Scratch& sc = thread_scratch(rows, dp);
    for (int64_t i = 0; i < items; ++i) decode_work_item<T>(p, sc, i / p.num_splits, int(i % p.num_splits), far_tiles);
    if (p.num_splits > 1)
      for (int64_t row = 0; row < out_rows; ++row) combine(row);
    return;
  }
#pragma omp parallel num_threads(threads)
  {
    Scratch& sc = thread_scratch(rows, dp);
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < items; ++i) decode_work_item<T>(p, sc, i / p.num_splits, int(i % p.num_splits), far_tiles);
    if (p.num_splits > 1) {
#pragma omp for schedule(static)
      for (int64_t row = 0; row < out_rows; ++row) combine(row);
    }
  }
}

template void decode_attention<float>(const DecodeParams&, int);
template void decode_attention<fp16_t>(const DecodeParams&, int);
template void decode_attention<bf16_t>(const DecodeParams&, int);

}  // namespace gk::cpu::GK_CPU_ISA_NS
