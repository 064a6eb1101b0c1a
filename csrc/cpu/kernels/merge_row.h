// The row merge of partial attention states (log-sum-exp weighted combine) of the CPU merge
// kernel (csrc/cpu/kernels/merge_attention_states.cpp), shared with the CPU decode kernel, which
// combines its fp32 split-KV partials with it. Included by CPU kernel sources, compiled once per
// ISA level with them.
//
// Per row, pass 1 folds the partials' log-sum-exps into SoftmaxStats (csrc/core, shared with the
// CUDA kernel), pass 2 streams each non-empty partial's head_dim vector once, SIMD, fp32
// accumulation, and writes the output once.
#pragma once
#include <cmath>
#include "core/merge_params.h"
#include "core/softmax_state.h"
#include "cpu/simd.h"

namespace gk::cpu::GK_CPU_ISA_NS::merge {

// Up to this many partials, a row first gathers the non-empty partials' pointers and weights
// (one expf each), so the streaming loops below are nothing but loads and FMAs.
constexpr int kMaxGathered = 64;

template <class T>
struct RowPartials {
  const MergeStatesParams& p;
  int64_t b, s, h;
  float lse(int64_t i) const {
    const float* base = i == 0 ? p.lse_first : p.lse_rest + (i - 1) * p.lse_partial_stride;
    const int64_t* st = i == 0 ? p.lse_first_stride : p.lse_rest_stride;
    return base[b * st[0] + h * st[1] + s * st[2]];
  }
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

  const T* src[kMaxGathered];
  float w[kMaxGathered];
  // Empty partials (lse = -inf) are skipped: their outputs are never read. More partials than
  // kMaxGathered (rare: split counts are small) take a scalar pass per element.
  if (N <= kMaxGathered) {
    int n = 0;
    for (int64_t i = 0; i < N; ++i) {
      const float lse = row.lse(i);
      if (lse == -INFINITY) continue;
      src[n] = row.out(i);
      w[n++] = stats.partial_weight(lse, inv_d);
    }
    weighted_sum(src, w, n, D, dst);
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

}  // namespace gk::cpu::GK_CPU_ISA_NS::merge
