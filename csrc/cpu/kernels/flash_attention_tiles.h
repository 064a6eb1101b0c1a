// Register-blocked micro-kernels of the CPU flash attention (csrc/cpu/kernels/flash_attention.cpp),
// compiled once per ISA level with it.
//
// The score tile is kept transposed, S^T[key][query], with queries along the SIMD lanes: then
//   S^T = K Q^T  broadcasts one K element per key (K used in place, no packing) against a
//                packed Q^T tile that is built once per query tile and reused for every key tile;
//   softmax      row statistics (max, sum) are per-lane vertical reductions over the keys;
//   O += P V     broadcasts one P element per query against V rows used in place.
// bf16 on AVX512-BF16 uses VDPBF16PS, which multiplies pairs: Q is packed as (d, d+1) pairs per
// query, K pairs are broadcast straight from memory, P and V are packed as (key, key+1) pairs.
// Accumulation is fp32 everywhere.
#pragma once
#include <cstdint>
#include <algorithm>
#include <cmath>
#include <cstring>
#include "cpu/simd.h"

namespace gk::cpu::GK_CPU_ISA_NS::flash {

constexpr int W = VecF::kWidth;
// Queries per tile: the lanes of S^T (2 x 4 AVX-512 vectors). A work unit copies each K / V
// tile it visits once (they are a head-stride apart in memory) for all its query tiles; 128
// queries halve that traffic against 64 (the copies fell from 11% to 6% of the time at seqlen
// 2048, before units shared them) while Q^T and O (128 x 256 fp32 at most, 128 KB each) still
// sit in L2.
constexpr int kBlockQ = 128;
// Short sequences use 64-query tiles instead: twice the work units (load balance) and half the
// masked work on the causal diagonal, where 128-query tiles waste up to a quarter of a 512 x 512
// causal problem. Every function below takes the query tile BQ as a template argument (the
// stride of Q^T, S^T and P).
constexpr int kBlockQShort = 64;
// Keys per tile: S^T is kBlockK x kBlockQ fp32 = 32 KB, next to the K tile it is built from.
constexpr int kBlockK = 64;
// Row stride (in floats) of Q^T, S^T / P^T and the P pairs: BQ plus one cache line. With a
// stride of exactly BQ (512 or 256 bytes) their rows fall into 1/8 or 1/4 of the L1 sets and
// evict each other (and the V slice, also a power of two apart) long before L1 is full.
constexpr int kRowPad = 16;
// Head-dim chunk of S^T = K Q^T for 128-query tiles (twice as deep for 64-query tiles): Q^T rows
// of one chunk are 32 KB + padding. Measured: 32 deep no faster than 64.
constexpr int kQKDepth = 64;
template <int BQ>
constexpr int kLd = BQ + kRowPad;
// The bf16 path (S^T, Q and P pairs) keeps the unpadded stride: padded it measured ~3% slower.
template <int BQ>
constexpr int kLdPairs = BQ;

// Register blocks (keys x query vectors for S^T, queries x head-dim vectors for O). AVX-512 has
// 32 registers: 6 x 4 = 24 accumulators + 4 operands + 1 broadcast, for S^T and for O alike
// (24 FMAs per 10 loads; the O update takes the remaining BQ % 6 rows in one smaller block).
// AVX2 has 16.
#if defined(GK_SIMD_AVX512)
constexpr int kQKRows = 6, kQKVecs = 4, kPVRows = 6, kPVVecs = 4;
#else
constexpr int kQKRows = 4, kQKVecs = 2, kPVRows = 4, kPVVecs = 2;
#endif
static_assert(kBlockQShort % (kQKVecs * W) == 0, "query chunks of the S^T block must tile the query tile");
static_assert(kBlockQ % kBlockQShort == 0, "the scratch sized for kBlockQ must hold a short tile");
static_assert(kBlockK % 2 == 0, "bf16 P / V pairs need an even key tile");

// Prefetches the rows of a tile into L2 a few rows at a time, spread over the micro-kernel blocks
// of the current tile: all at once (1024 lines at head dim 128) the prefetches stalled the core
// on its miss buffers (up to 15% of the time in the copies and prefetch loops).
struct RowPrefetcher {
  const char* base = nullptr;
  int64_t stride = 0, bytes = 0;  // in bytes
  int rows = 0, next = 0, per_step = 0;
  void start(const void* p, int64_t stride_bytes, int n, int64_t row_bytes, int steps) {
    base = static_cast<const char*>(p), stride = stride_bytes, bytes = row_bytes, rows = n, next = 0;
    per_step = steps > 0 ? (n + steps - 1) / steps : n;
  }
  GK_INLINE void step() {
    for (int e = std::min(rows, next + per_step); next < e; ++next)
      for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(base + next * stride + b, 0, 2);
  }
  void finish() {
    per_step = rows;
    step();
  }
};

// The right edge (causal or right window) of the mask on a key tile that crosses it: key j of the
// tile is visible to the query at lane q only if j <= pos[q] + offset. Query positions grow with
// the lane, so a block of queries sees at most keys [0, keys_for(last lane)). The micro-kernels
// skip key blocks that no query of a block sees: their scores are left for finish_scores to mask,
// their probabilities are exactly 0 (on the causal diagonal this saves about a quarter of the
// S^T work and half of the P V work of the two tiles the diagonal crosses).
struct KeyLimit {
  const float* pos = nullptr;  // null: no limit
  float offset = 0.f;
  GK_INLINE int keys_for(int last_lane, int n) const {
    if (!pos) return n;
    const float k = pos[last_lane] + offset + 1.f;
    return k <= 0.f ? 0 : k >= float(n) ? n : int(k);
  }
};

// ---------------------------------------------------------------------------------- S^T = K Q^T
// st[r][c] (r < R keys, c < C*W queries) = sum_d k[r * k_stride + d] * qt[d * kLd<BQ> + c].
// kMax: also folds the block's scores into the per-query running maximum mx[0 : C*W], so that
// the softmax needs no separate pass over S^T for it (the common, unmasked case).
template <int BQ, int R, int C, bool kAccumulate, bool kMax, class TK>
GK_INLINE void qk_block(const float* qt, const TK* k, int64_t k_stride, int64_t D, float* st, float* mx) {
  VecF acc[R][C];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) acc[r][c] = kAccumulate ? VecF::load(st + r * kLd<BQ> + c * W) : VecF::zero();
  for (int64_t d = 0; d < D; ++d) {
    VecF qv[C];
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) qv[c] = VecF::load(qt + d * kLd<BQ> + c * W);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const VecF kb = VecF::set1(k[r * k_stride + d]);
#pragma GCC unroll 8
      for (int c = 0; c < C; ++c) acc[r][c] = fmadd(kb, qv[c], acc[r][c]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) acc[r][c].store(st + r * kLd<BQ> + c * W);
  if constexpr (kMax) {
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) {
      VecF m = VecF::load(mx + c * W);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) m = max(m, acc[r][c]);
      m.store(mx + c * W);
    }
  }
}

// The last n < kQKRows keys in one block of n rows (a 1-row block is latency bound: 4 chains).
// `first` is the index of these keys in the tile (for the KeyLimit).
template <int BQ, int R, bool kAccumulate, bool kMax, class TK>
GK_INLINE void qk_rest(const float* qt, const TK* k, int64_t k_stride, int n, int64_t D, float* st, float* mx,
                       const KeyLimit& lim, int first, int n_tile) {
  constexpr int QC = kQKVecs * W;
  if constexpr (R > 0) {
    if (n == R) {
      for (int i = 0; i < BQ; i += QC)
        if (first < lim.keys_for(i + QC - 1, n_tile))
          qk_block<BQ, R, kQKVecs, kAccumulate, kMax>(qt + i, k, k_stride, D, st + i, mx + i);
      return;
    }
    qk_rest<BQ, R - 1, kAccumulate, kMax>(qt, k, k_stride, n, D, st, mx, lim, first, n_tile);
  }
}

// S^T for n keys (rows of k at k_stride) against the whole query tile, over head-dim chunks
// [d0, d0 + kQKDepth): S^T is accumulated chunk by chunk so that the Q^T rows of one chunk
// (kQKDepth x BQ fp32, 32 KB at most) stay in L1 for all key blocks; without the split, Q^T
// (64 KB at head dim 128) streamed from L2 once per 6-key block. Key blocks are the next loop
// (each block's 6 K rows stay in L1). Measured on the Zen 5 box: 12 x 2 blocks (12 broadcasts +
// 2 loads per 24 FMAs) were 15% slower than these 6 x 4 blocks (6 + 4).
template <bool kAccumulate, bool kMax, int BQ, class TK>
inline void qk_tile_chunk(const float* qt, const TK* k, int64_t k_stride, int n, int64_t D, float* st,
                          RowPrefetcher* pf, float* mx, const KeyLimit& lim) {
  constexpr int R = kQKRows, QC = kQKVecs * W;
  int j = 0;
  for (; j + R <= n; j += R) {
    for (int i = 0; i < BQ; i += QC)
      if (j < lim.keys_for(i + QC - 1, n))
        qk_block<BQ, R, kQKVecs, kAccumulate, kMax>(qt + i, k + j * k_stride, k_stride, D, st + j * kLd<BQ> + i, mx + i);
    if (pf) pf->step();
  }
  if (j < n)
    qk_rest<BQ, R - 1, kAccumulate, kMax>(qt, k + j * k_stride, k_stride, n - j, D, st + j * kLd<BQ>, mx, lim, j, n);
}

// pf (optional): prefetcher stepped once per key block, qk_steps(n, D) times; the caller finishes it.
template <int BQ>
constexpr int64_t qk_depth() { return kQKDepth * kBlockQ / BQ; }
template <int BQ>
inline int qk_steps(int n, int64_t D) { return n / kQKRows * int((D + qk_depth<BQ>() - 1) / qk_depth<BQ>()); }

// mx (optional): receives the per-query maximum of the n keys' S^T (BQ floats), computed by the
// last head-dim chunk as it stores its scores.
template <int BQ, class TK>
inline void qk_tile(const float* qt, const TK* k, int64_t k_stride, int n, int64_t D, float* st,
                    RowPrefetcher* pf = nullptr, float* mx = nullptr, const KeyLimit& lim = {}) {
  constexpr int64_t kDepth = qk_depth<BQ>();
  for (int64_t d0 = 0; d0 < D; d0 += kDepth) {
    const int64_t dd = std::min<int64_t>(kDepth, D - d0);
    const bool last = d0 + kDepth >= D;
    if (last && mx) {
      std::fill(mx, mx + BQ, -INFINITY);
      if (d0 == 0) qk_tile_chunk<false, true, BQ>(qt, k, k_stride, n, dd, st, pf, mx, lim);
      else qk_tile_chunk<true, true, BQ>(qt + d0 * kLd<BQ>, k + d0, k_stride, n, dd, st, pf, mx, lim);
    } else if (d0 == 0) {
      qk_tile_chunk<false, false, BQ>(qt, k, k_stride, n, dd, st, pf, mx, lim);
    } else {
      qk_tile_chunk<true, false, BQ>(qt + d0 * kLd<BQ>, k + d0, k_stride, n, dd, st, pf, mx, lim);
    }
  }
}

// ---------------------------------------------------------------------------------- O += P V
// o[r][0 : C*W] = o[r] * alpha[r] + sum_j pt[j * kLd<BQ> + r] * v[j * v_stride + 0 : C*W] for R
// queries; `tail` > 0: the last vector has only `tail` valid head-dim lanes in v (the rest of o
// is padding and stays finite).
template <int BQ, int R, int C, bool kTail, class TV>
GK_INLINE void pv_block(const float* pt, int n, const TV* v, int64_t v_stride, const float* alpha, float* o,
                        int64_t o_stride, int tail) {
  VecF acc[R][C];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    const VecF a = VecF::set1(alpha[r]);
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) acc[r][c] = VecF::load(o + r * o_stride + c * W) * a;
  }
  for (int j = 0; j < n; ++j) {
    VecF vv[C];
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c)
      vv[c] = (kTail && c == C - 1) ? load_first(v + j * v_stride + c * W, tail) : VecF::load(v + j * v_stride + c * W);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const VecF pb = VecF::set1(pt[j * kLd<BQ> + r]);
#pragma GCC unroll 8
      for (int c = 0; c < C; ++c) acc[r][c] = fmadd(pb, vv[c], acc[r][c]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) acc[r][c].store(o + r * o_stride + c * W);
}

// All BQ query rows of one head-dim chunk [d, d + C*W): kPVRows-row blocks, then the rest.
template <int BQ, int C, bool kTail, class TV>
GK_INLINE void pv_rows(const float* pt, int n, const TV* v, int64_t v_stride, const float* alpha, float* o,
                       int64_t o_stride, int tail, RowPrefetcher* pf, const KeyLimit& lim) {
  constexpr int R = kPVRows, kRest = BQ % kPVRows;
  int i = 0;
  for (; i + R <= BQ; i += R) {
    pv_block<BQ, R, C, kTail>(pt + i, lim.keys_for(i + R - 1, n), v, v_stride, alpha + i, o + i * o_stride, o_stride, tail);
    if (pf) pf->step();
  }
  if constexpr (kRest > 0)
    pv_block<BQ, kRest, C, kTail>(pt + i, lim.keys_for(BQ - 1, n), v, v_stride, alpha + i, o + i * o_stride, o_stride, tail);
}

// O (BQ x o_stride fp32, o_stride = D rounded up to W) = O * alpha + P V for n keys. The
// head-dim chunk is the outer loop: its slice of the V tile (64 keys x 64 floats, 16 KB) stays
// in L1 while every query row block streams over it. (Row blocks outer, V tile and the block's
// P^T columns in L1, measured no faster.)
// pf (optional; the caller finishes it): prefetcher stepped once per 6-row block of the full head-dim chunks,
// (BQ / kPVRows) * (D / (kPVVecs * W)) times.
template <int BQ>
inline int pv_steps(int64_t D) { return BQ / kPVRows * int(D / (kPVVecs * W)); }

template <int BQ, class TV>
inline void pv_tile(const float* pt, int n, const TV* v, int64_t v_stride, const float* alpha, float* o,
                    int64_t o_stride, int64_t D, RowPrefetcher* pf = nullptr, const KeyLimit& lim = {}) {
  constexpr int DC = kPVVecs * W;
  const int tail = int(D % W);
  int64_t d = 0;
  for (; d + DC <= D; d += DC) pv_rows<BQ, kPVVecs, false>(pt, n, v + d, v_stride, alpha, o + d, o_stride, 0, pf, lim);
  for (; d + W <= D; d += W) pv_rows<BQ, 1, false>(pt, n, v + d, v_stride, alpha, o + d, o_stride, 0, nullptr, lim);
  if (tail) pv_rows<BQ, 1, true>(pt, n, v + d, v_stride, alpha, o + d, o_stride, tail, nullptr, lim);
}

#if defined(GK_SIMD_AVX512)
// ---------------------------------------------------------------------------------- bf16 pairs
// S^T for R keys: qp holds Q as (d, d+1) pairs, qp[dp * kLdPairs<BQ> + i] = (q[i][2dp], q[i][2dp+1]);
// each K pair is broadcast from its row.
template <int BQ, int R, int C>
GK_INLINE void qk_block_bf16(const uint32_t* qp, const bf16_t* k, int64_t k_stride, int64_t D, float* st) {
  VecF acc[R][C];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) acc[r][c] = VecF::zero();
  for (int64_t dp = 0; dp < D / 2; ++dp) {
    VecBF16Pairs qv[C];
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) qv[c] = VecBF16Pairs::load(qp + dp * kLdPairs<BQ> + c * W);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const VecBF16Pairs kb = VecBF16Pairs::broadcast(k + r * k_stride + 2 * dp);
#pragma GCC unroll 8
      for (int c = 0; c < C; ++c) acc[r][c] = dot_bf16_pairs(kb, qv[c], acc[r][c]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) acc[r][c].store(st + r * kLdPairs<BQ> + c * W);
}

template <int BQ>
inline void qk_tile_bf16(const uint32_t* qp, const bf16_t* k, int64_t k_stride, int n, int64_t D, float* st,
                         const KeyLimit& lim = {}) {
  constexpr int R = kQKRows, QC = kQKVecs * W;
  int j = 0;
  for (; j + R <= n; j += R)
    for (int i = 0; i < BQ; i += QC)
      if (j < lim.keys_for(i + QC - 1, n))
        qk_block_bf16<BQ, R, kQKVecs>(qp + i, k + j * k_stride, k_stride, D, st + j * kLdPairs<BQ> + i);
  for (; j < n; ++j)
    for (int i = 0; i < BQ; i += QC)
      if (j < lim.keys_for(i + QC - 1, n))
        qk_block_bf16<BQ, 1, kQKVecs>(qp + i, k + j * k_stride, k_stride, D, st + j * kLdPairs<BQ> + i);
}

// O update from pairs: pp[jp * kLdPairs<BQ> + i] = (p[2jp][i], p[2jp+1][i]) and
// vp[jp * o_stride + d] = (v[2jp][d], v[2jp+1][d]), zero-padded to o_stride head-dim lanes.
template <int BQ, int R, int C>
GK_INLINE void pv_block_bf16(const uint32_t* pp, int npairs, const uint32_t* vp, int64_t o_stride, const float* alpha,
                             float* o) {
  VecF acc[R][C];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    const VecF a = VecF::set1(alpha[r]);
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) acc[r][c] = VecF::load(o + r * o_stride + c * W) * a;
  }
  for (int jp = 0; jp < npairs; ++jp) {
    VecBF16Pairs vv[C];
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) vv[c] = VecBF16Pairs::load(vp + jp * o_stride + c * W);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const VecBF16Pairs pb = VecBF16Pairs::broadcast(pp + jp * kLdPairs<BQ> + r);
#pragma GCC unroll 8
      for (int c = 0; c < C; ++c) acc[r][c] = dot_bf16_pairs(pb, vv[c], acc[r][c]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) acc[r][c].store(o + r * o_stride + c * W);
}

template <int BQ, int C>
GK_INLINE void pv_rows_bf16(const uint32_t* pp, int n, const uint32_t* vp, int64_t o_stride, const float* alpha,
                            float* o, const KeyLimit& lim) {
  constexpr int R = kPVRows, kRest = BQ % kPVRows;
  int i = 0;
  for (; i + R <= BQ; i += R)
    pv_block_bf16<BQ, R, C>(pp + i, (lim.keys_for(i + R - 1, n) + 1) / 2, vp, o_stride, alpha + i, o + i * o_stride);
  if constexpr (kRest > 0)
    pv_block_bf16<BQ, kRest, C>(pp + i, (lim.keys_for(BQ - 1, n) + 1) / 2, vp, o_stride, alpha + i, o + i * o_stride);
}

// Head-dim chunk outer, as in pv_tile; n keys (n / 2 rounded up pairs).
template <int BQ>
inline void pv_tile_bf16(const uint32_t* pp, int n, const uint32_t* vp, const float* alpha, float* o, int64_t o_stride,
                         const KeyLimit& lim = {}) {
  constexpr int DC = kPVVecs * W;
  int64_t d = 0;
  for (; d + DC <= o_stride; d += DC) pv_rows_bf16<BQ, kPVVecs>(pp, n, vp + d, o_stride, alpha, o + d, lim);
  for (; d < o_stride; d += W) pv_rows_bf16<BQ, 1>(pp, n, vp + d, o_stride, alpha, o + d, lim);
}

// vp[jp][d] = (v[2jp][d], v[2jp+1][d]) for n rows of v (the missing odd row and the lanes
// beyond D are 0), o_stride words per pair row.
inline void pack_v_pairs(const bf16_t* v, int64_t v_stride, int n, int64_t D, int64_t o_stride, uint32_t* vp) {
  const __m512i lo_idx = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8,
                                          39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
  const __m512i hi_idx = _mm512_add_epi16(lo_idx, _mm512_set1_epi16(16));
  for (int jp = 0; jp < (n + 1) / 2; ++jp) {
    const bf16_t* r0 = v + 2 * jp * v_stride;
    const bf16_t* r1 = 2 * jp + 1 < n ? r0 + v_stride : nullptr;
    uint32_t* dst = vp + jp * o_stride;
    for (int64_t d = 0; d < o_stride; d += 32) {
      const int64_t left = D - d;
      const __mmask32 m = left >= 32 ? ~__mmask32(0) : left <= 0 ? 0 : __mmask32((1u << left) - 1);
      const __m512i a = _mm512_maskz_loadu_epi16(m, r0 + d);
      const __m512i b = r1 ? _mm512_maskz_loadu_epi16(m, r1 + d) : _mm512_setzero_si512();
      _mm512_storeu_si512(dst + d, _mm512_permutex2var_epi16(a, lo_idx, b));
      if (d + 16 < o_stride) _mm512_storeu_si512(dst + d + 16, _mm512_permutex2var_epi16(a, hi_idx, b));
    }
  }
}
#endif  // GK_SIMD_AVX512

}  // namespace gk::cpu::GK_CPU_ISA_NS::flash
