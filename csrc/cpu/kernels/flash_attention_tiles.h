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
#include <cstring>
#include "cpu/simd.h"

namespace gk::cpu::GK_CPU_ISA_NS::flash {

constexpr int W = VecF::kWidth;
// Queries per tile: the lanes of S^T (4 AVX-512 vectors). 64 keeps the per-tile Q^T (64 x 256
// fp32 at most, 64 KB) and O (the same) in L2 and amortises the Q packing over every key tile.
constexpr int kBlockQ = 64;
// Keys per tile: S^T is kBlockK x kBlockQ fp32 = 16 KB, in L1 with the K rows it is built from.
constexpr int kBlockK = 64;

// Register blocks (keys x query vectors for S^T, queries x head-dim vectors for O). AVX-512 has
// 32 registers: 6 x 4 = 24 accumulators + 4 operands + 1 broadcast for S^T, 4 x 4 for O (4 rows
// divide the query tile, so the O update needs no remainder path). AVX2 has 16.
#if defined(GK_SIMD_AVX512)
constexpr int kQKRows = 6, kQKVecs = 4, kPVRows = 4, kPVVecs = 4;
#else
constexpr int kQKRows = 4, kQKVecs = 2, kPVRows = 4, kPVVecs = 2;
#endif
static_assert(kBlockQ % (kQKVecs * W) == 0, "query chunks of the S^T block must tile the query tile");
static_assert(kBlockQ % kPVRows == 0, "O row blocks must tile the query tile");
static_assert(kBlockK % 2 == 0, "bf16 P / V pairs need an even key tile");

// ---------------------------------------------------------------------------------- S^T = K Q^T
// st[r][c] (r < R keys, c < C*W queries) = sum_d k[r * k_stride + d] * qt[d * kBlockQ + c].
template <int R, int C, class TK>
GK_INLINE void qk_block(const float* qt, const TK* k, int64_t k_stride, int64_t D, float* st) {
  VecF acc[R][C];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) acc[r][c] = VecF::zero();
  for (int64_t d = 0; d < D; ++d) {
    VecF qv[C];
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) qv[c] = VecF::load(qt + d * kBlockQ + c * W);
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
    for (int c = 0; c < C; ++c) acc[r][c].store(st + r * kBlockQ + c * W);
}

// S^T for n keys (rows of k at k_stride) against the whole query tile.
template <class TK>
inline void qk_tile(const float* qt, const TK* k, int64_t k_stride, int n, int64_t D, float* st) {
  constexpr int R = kQKRows, QC = kQKVecs * W;
  int j = 0;
  for (; j + R <= n; j += R)
    for (int i = 0; i < kBlockQ; i += QC) qk_block<R, kQKVecs>(qt + i, k + j * k_stride, k_stride, D, st + j * kBlockQ + i);
  for (; j < n; ++j)
    for (int i = 0; i < kBlockQ; i += QC) qk_block<1, kQKVecs>(qt + i, k + j * k_stride, k_stride, D, st + j * kBlockQ + i);
}

// ---------------------------------------------------------------------------------- O += P V
// o[r][0 : C*W] = o[r] * alpha[r] + sum_j pt[j * kBlockQ + r] * v[j * v_stride + 0 : C*W] for R
// queries; `tail` > 0: the last vector has only `tail` valid head-dim lanes in v (the rest of o
// is padding and stays finite).
template <int R, int C, bool kTail, class TV>
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
      const VecF pb = VecF::set1(pt[j * kBlockQ + r]);
#pragma GCC unroll 8
      for (int c = 0; c < C; ++c) acc[r][c] = fmadd(pb, vv[c], acc[r][c]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) acc[r][c].store(o + r * o_stride + c * W);
}

// O (kBlockQ x o_stride fp32, o_stride = D rounded up to W) = O * alpha + P V for n keys.
template <class TV>
inline void pv_tile(const float* pt, int n, const TV* v, int64_t v_stride, const float* alpha, float* o,
                    int64_t o_stride, int64_t D) {
  constexpr int R = kPVRows, DC = kPVVecs * W;
  const int tail = int(D % W);
  for (int i = 0; i < kBlockQ; i += R) {
    int64_t d = 0;
    for (; d + DC <= D; d += DC) pv_block<R, kPVVecs, false>(pt + i, n, v + d, v_stride, alpha + i, o + i * o_stride + d, o_stride, 0);
    for (; d + W <= D; d += W) pv_block<R, 1, false>(pt + i, n, v + d, v_stride, alpha + i, o + i * o_stride + d, o_stride, 0);
    if (tail) pv_block<R, 1, true>(pt + i, n, v + d, v_stride, alpha + i, o + i * o_stride + d, o_stride, tail);
  }
}

#if defined(GK_SIMD_AVX512)
// ---------------------------------------------------------------------------------- bf16 pairs
// S^T for R keys: qp holds Q as (d, d+1) pairs, qp[dp * kBlockQ + i] = (q[i][2dp], q[i][2dp+1]);
// each K pair is broadcast from its row.
template <int R, int C>
GK_INLINE void qk_block_bf16(const uint32_t* qp, const bf16_t* k, int64_t k_stride, int64_t D, float* st) {
  VecF acc[R][C];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) acc[r][c] = VecF::zero();
  for (int64_t dp = 0; dp < D / 2; ++dp) {
    VecBF16Pairs qv[C];
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) qv[c] = VecBF16Pairs::load(qp + dp * kBlockQ + c * W);
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
    for (int c = 0; c < C; ++c) acc[r][c].store(st + r * kBlockQ + c * W);
}

inline void qk_tile_bf16(const uint32_t* qp, const bf16_t* k, int64_t k_stride, int n, int64_t D, float* st) {
  constexpr int R = kQKRows, QC = kQKVecs * W;
  int j = 0;
  for (; j + R <= n; j += R)
    for (int i = 0; i < kBlockQ; i += QC) qk_block_bf16<R, kQKVecs>(qp + i, k + j * k_stride, k_stride, D, st + j * kBlockQ + i);
  for (; j < n; ++j)
    for (int i = 0; i < kBlockQ; i += QC) qk_block_bf16<1, kQKVecs>(qp + i, k + j * k_stride, k_stride, D, st + j * kBlockQ + i);
}

// O update from pairs: pp[jp * kBlockQ + i] = (p[2jp][i], p[2jp+1][i]) and
// vp[jp * o_stride + d] = (v[2jp][d], v[2jp+1][d]), zero-padded to o_stride head-dim lanes.
template <int R, int C>
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
      const VecBF16Pairs pb = VecBF16Pairs::broadcast(pp + jp * kBlockQ + r);
#pragma GCC unroll 8
      for (int c = 0; c < C; ++c) acc[r][c] = dot_bf16_pairs(pb, vv[c], acc[r][c]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) acc[r][c].store(o + r * o_stride + c * W);
}

inline void pv_tile_bf16(const uint32_t* pp, int npairs, const uint32_t* vp, const float* alpha, float* o, int64_t o_stride) {
  constexpr int R = kPVRows, DC = kPVVecs * W;
  for (int i = 0; i < kBlockQ; i += R) {
    int64_t d = 0;
    for (; d + DC <= o_stride; d += DC) pv_block_bf16<R, kPVVecs>(pp + i, npairs, vp + d, o_stride, alpha + i, o + i * o_stride + d);
    for (; d < o_stride; d += W) pv_block_bf16<R, 1>(pp + i, npairs, vp + d, o_stride, alpha + i, o + i * o_stride + d);
  }
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
