// The row merge of partial attention states (log-sum-exp weighted combine) of the CPU merge
// kernel (csrc/cpu/kernels/merge_attention_states.cpp), shared with the CPU decode kernel, which
// combines its fp32 split-KV partials with it. Included by CPU kernel sources, compiled once per
// ISA level with them.
//
// Per row, pass 1 folds the partials' log-sum-exps into SoftmaxStats (csrc/core, shared with the
// CUDA kernel), pass 2 streams each non-empty partial's head_dim vector once, SIMD, fp32
// accumulation, and writes the output once. merge_block_along_s does pass 1 for a vector of
// positions at once when the LSEs allow it.
#pragma once
#include <algorithm>
#include <cmath>
#include "core/merge_params.h"
#include "core/softmax_state.h"
#include "cpu/simd.h"

namespace gk::cpu::GK_CPU_ISA_NS::merge {

// Up to this many partials, a row first gathers the non-empty partials' pointers and weights
// (sum_nonempty_partials).
constexpr int kMaxGathered = 64;

template <class T>
struct RowPartials {
  const MergeStatesParams& p;
  int64_t b, s, h;
  const float* lse_ptr(int64_t i) const {
    const float* base = i == 0 ? p.lse_first : p.lse_rest + (i - 1) * p.lse_partial_stride;
    const int64_t* st = i == 0 ? p.lse_first_stride : p.lse_rest_stride;
    return base + b * st[0] + h * st[1] + s * st[2];
  }
  float lse(int64_t i) const { return *lse_ptr(i); }
  const T* out(int64_t i) const {
    const T* base = static_cast<const T*>(i == 0 ? p.out_first : p.out_rest) + (i == 0 ? 0 : (i - 1) * p.out_partial_stride);
    const int64_t* st = i == 0 ? p.out_first_stride : p.out_rest_stride;
    return base + b * st[0] + s * st[1] + h * st[2];
  }
};

// dst[0:D] = sum_k w[k] * src[k][0:D], fp32 accumulation.
template <class T, class TOut>
void weighted_sum(const T* const* src, const float* w, int n, int64_t D, TOut* dst) {
  constexpr int W = VecF::kWidth;
  int64_t d0 = 0;
  // Blocks of 4 vectors keep 4 independent accumulators in flight.
  for (; d0 + 4 * W <= D; d0 += 4 * W) {
    VecF acc[4] = {VecF::zero(), VecF::zero(), VecF::zero(), VecF::zero()};
    for (int k = 0; k < n; ++k) {
      const VecF wk = VecF::set1(w[k]);
      const T* x = src[k] + d0;
      for (int j = 0; j < 4; ++j) acc[j] = fmadd(wk, VecF::load(x + j * W), acc[j]);
    }
    for (int j = 0; j < 4; ++j) acc[j].store(dst + d0 + j * W);
  }
  for (; d0 + W <= D; d0 += W) {
    VecF acc = VecF::zero();
    for (int k = 0; k < n; ++k) acc = fmadd(VecF::set1(w[k]), VecF::load(src[k] + d0), acc);
    acc.store(dst + d0);
  }
  for (; d0 < D; ++d0) {
    float acc = 0.f;
    for (int k = 0; k < n; ++k) acc += w[k] * to_float(src[k][d0]);
    dst[d0] = from_float<TOut>(acc);
  }
}

// dst = sum over the non-empty partials i of row (lse_of(i) != -inf; N <= kMaxGathered) of
// weight_of(i, lse_of(i)) * out(i): empty partials are skipped, their outputs never read (they may hold
// garbage or NaN). The pointers and weights are gathered first, so the streaming loops of
// weighted_sum are nothing but loads and FMAs.
template <class T, class TOut, class LseOf, class WeightOf>
void sum_nonempty_partials(const RowPartials<T>& row, int64_t N, LseOf lse_of, WeightOf weight_of, int64_t D, TOut* dst) {
  const T* src[kMaxGathered];
  float w[kMaxGathered];
  int n = 0;
  for (int64_t i = 0; i < N; ++i) {
    const float lse = lse_of(i);
    if (lse == -INFINITY) continue;
    src[n] = row.out(i);
    w[n++] = weight_of(i, lse);
  }
  weighted_sum(src, w, n, D, dst);
}

// Row (b, s, h): the partials are T (p.out_first / p.out_rest), the output TOut at dst (D
// elements) and the log-sum-exp at dst_lse (may be null).
template <class T, class TOut = T>
void merge_row(const MergeStatesParams& p, int64_t b, int64_t s, int64_t h, TOut* dst, float* dst_lse) {
  const int64_t D = p.head_dim, N = p.num_partials;
  const RowPartials<T> row{p, b, s, h};

  SoftmaxStats stats;
  for (int64_t i = 0; i < N; ++i) stats.merge_partial(row.lse(i));
  // NaN statistics (a NaN or +inf lse) make inv_d NaN, hence every weight and the output NaN.
  const float inv_d = stats.inv_denominator();
  if (dst_lse) *dst_lse = stats.lse();

  // Empty partials (lse = -inf) are skipped: their outputs are never read. More partials than
  // kMaxGathered (rare: split counts are small) take a scalar pass per element.
  if (N <= kMaxGathered) {
    sum_nonempty_partials(row, N, [&](int64_t i) { return row.lse(i); },
                          [&](int64_t, float lse) { return stats.partial_weight(lse, inv_d); }, D, dst);
    return;
  }
  for (int64_t d = 0; d < D; ++d) {
    float acc = 0.f;
    for (int64_t i = 0; i < N; ++i) {
      const float lse = row.lse(i);
      if (lse == -INFINITY) continue;
      acc += stats.partial_weight(lse, inv_d) * to_float(row.out(i)[d]);
    }
    dst[d] = from_float<TOut>(acc);
  }
}

// Whether merge_block_along_s applies: every partial's LSE contiguous along the sequence (the
// layout of the op's outputs) and few enough partials to gather.
inline bool lse_contiguous_along_s(const MergeStatesParams& p) {
  return p.num_partials <= kMaxGathered && p.lse_first_stride[2] == 1 && (p.num_partials == 1 || p.lse_rest_stride[2] == 1);
}

// Scratch of merge_block_along_s, in floats per array: at most this many (head, partial, lane)
// statistics per block.
constexpr int kBlockStats = 2048;

// Heads per block for N partials: whole heads while N * kWidth * heads fits kBlockStats.
inline int64_t block_heads(int64_t heads, int64_t num_partials) {
  return std::max<int64_t>(1, std::min<int64_t>(heads, kBlockStats / (num_partials * VecF::kWidth)));
}

// The rows (b, s0 + j, h0 + k), j < n <= VecF::kWidth, k < nh (nh <= block_heads), for LSEs
// contiguous along s. First the statistics: per head one vector of LSEs per partial, the n rows
// on SIMD lanes with the rule of softmax_rescale (the same special values as merge_row: -inf
// partials skipped, NaN or +inf poisoning the row), where merge_row spends 2 + N scalar expf per
// row. Then the rows in memory order (position by position, heads in order), each one streaming
// its partials as merge_row does. dst points at row (b, s0, h0) of the contiguous
// (batch, seqlen, heads, head_dim) output; dst_lse (may be null) at (b, h0, s0) of (batch,
// heads, seqlen).
template <class T, class TOut = T>
void merge_block_along_s(const MergeStatesParams& p, int64_t b, int64_t s0, int n, int64_t h0, int64_t nh, TOut* dst,
                         float* dst_lse) {
  constexpr int W = VecF::kWidth;
  const int64_t N = p.num_partials, D = p.head_dim, H = p.heads, S = p.seqlen;
  // nh * N * W <= kBlockStats (block_heads), so each array holds the block's statistics
  alignas(64) float lse[kBlockStats], wv[kBlockStats], mv[kBlockStats], dv[kBlockStats];
  for (int64_t k = 0; k < nh; ++k) {
    const RowPartials<T> rows{p, b, s0, h0 + k};
    VecF m = VecF::set1(-INFINITY), d = VecF::zero();
    float* l = lse + k * N * W;
    for (int64_t i = 0; i < N; ++i) {
      const float* src = rows.lse_ptr(i);
      for (int j = 0; j < W; ++j) l[i * W + j] = j < n ? src[j] : -INFINITY;
      const VecF x = VecF::load(l + i * W);
      const SoftmaxRescale<VecF> r = softmax_rescale<VecSoftmaxOps>(m, x);
      d = fmadd(d, r.self, vexp(x - r.base));  // an empty lane (x = -inf) adds exp(-inf) = 0
      m = r.m_new;
    }
    m.store(mv + k * W), d.store(dv + k * W);
    alignas(64) float inv[W];
    for (int j = 0; j < W; ++j) inv[j] = softmax_inv_denominator(dv[k * W + j]);
    // weight of partial i in row j, read only where its LSE is not -inf
    for (int64_t i = 0; i < N; ++i) (vexp(VecF::load(l + i * W) - m) * VecF::load(inv)).store(wv + (k * N + i) * W);
    if (dst_lse)
      for (int j = 0; j < n; ++j) dst_lse[k * S + j] = softmax_lse(mv[k * W + j], dv[k * W + j]);
  }
  for (int j = 0; j < n; ++j) {
    for (int64_t k = 0; k < nh; ++k) {
      const int64_t base = k * N * W + j;  // (head k, partial i, lane j) at base + i * W
      sum_nonempty_partials(RowPartials<T>{p, b, s0 + j, h0 + k}, N, [&](int64_t i) { return lse[base + i * W]; },
                            [&](int64_t i, float) { return wv[base + i * W]; }, D, dst + (j * H + k) * D);
    }
  }
}

}  // namespace gk::cpu::GK_CPU_ISA_NS::merge
