// Online-softmax state: the one implementation of the log-sum-exp bookkeeping that every
// attention kernel (CPU, CUDA, emulated) and the merge op share.
//
// A state summarises a set of scores s_j and values v_j as
//   m = max_j s_j,  d = sum_j exp(s_j - m),  o = sum_j exp(s_j - m) v_j   (o unnormalised)
// so that softmax(s) @ v = o / d and logsumexp(s) = m + log(d). Two states combine exactly by
// rescaling both to the larger max. The empty state is m = -inf, d = 0, o = 0.
//
// Special values, relied on by the tests and documented in the Python API:
//  - a partial with m = -inf is empty and contributes nothing, whatever its o holds
//    (it may hold garbage or NaN: it is never multiplied in);
//  - NaN in m, or m = +inf, propagates: the merged o and log-sum-exp become NaN;
//  - normalising an empty state gives o = 0 and log-sum-exp -inf, never NaN.
#pragma once
#include <cmath>
#include "core/common.h"

namespace gk {

// Factors by which the accumulators of the two sides of a merge are multiplied.
struct MergeFactors {
  float self;
  float other;
};

// Folds statistics (m2, d2) into (m, d) and returns the rescale factors. An empty other side
// returns {1, 0} and the caller must skip its accumulator (0 * NaN would still be NaN).
GK_HOST_DEVICE GK_INLINE MergeFactors merge_softmax_stats(float& m, float& d, float m2, float d2) {
  if (m2 == -INFINITY) return {1.f, 0.f};
  if (m == -INFINITY) {
    m = m2;
    d = d2;
    return {0.f, 1.f};
  }
  // `m > m2` is false when either is NaN, so a NaN on either side lands in m_new or in the
  // exponent below and propagates; +inf gives exp(inf - inf) = NaN on purpose.
  const float m_new = m > m2 ? m : m2;
  const float self = expf(m - m_new), other = expf(m2 - m_new);
  d = d * self + d2 * other;
  m = m_new;
  return {self, other};
}

// log-sum-exp of a state; -inf for the empty state.
GK_HOST_DEVICE GK_INLINE float softmax_lse(float m, float d) {
  return d > 0.f ? m + logf(d) : (d == 0.f ? -INFINITY : NAN);
}

// 1/d, the factor that normalises o; 0 for the empty state so that the output is 0.
GK_HOST_DEVICE GK_INLINE float softmax_inv_denominator(float d) {
  return d > 0.f ? 1.f / d : (d == 0.f ? 0.f : NAN);
}

// The scalar part of a state: (m, d). Kernels that keep o in their own layout (SIMD vectors,
// MMA fragments) use this and apply the returned factors to their accumulators themselves.
struct SoftmaxStats {
  float m = -INFINITY;
  float d = 0.f;

  // Folds in the statistics of another state; returns the factors for the two accumulators.
  GK_HOST_DEVICE GK_INLINE MergeFactors merge(float m2, float d2) { return merge_softmax_stats(m, d, m2, d2); }
  // Folds in a finished partial result with log-sum-exp `lse` (as a state: m = lse, d = 1).
  GK_HOST_DEVICE GK_INLINE MergeFactors merge_partial(float lse) { return merge_softmax_stats(m, d, lse, 1.f); }
  // Once every partial is folded in: the weight of a partial with log-sum-exp `lse` in the
  // normalised combination, exp(lse - m) / d. Callers skip empty partials (lse = -inf).
  GK_HOST_DEVICE GK_INLINE float partial_weight(float lse, float inv_d) const { return expf(lse - m) * inv_d; }
  GK_HOST_DEVICE GK_INLINE float inv_denominator() const { return softmax_inv_denominator(d); }
  GK_HOST_DEVICE GK_INLINE float lse() const { return softmax_lse(m, d); }
};

// A state carrying N accumulator values in registers (one lane's slice of a row).
template <int N>
struct OnlineSoftmaxState {
  SoftmaxStats stats;
  float o[N] = {};

  // Folds in a finished partial result: normalised output `o_p` with log-sum-exp `lse`.
  GK_HOST_DEVICE GK_INLINE void merge_partial(const float (&o_p)[N], float lse) {
    if (lse == -INFINITY) return;
    const MergeFactors f = stats.merge_partial(lse);
#pragma unroll
    for (int i = 0; i < N; ++i) o[i] = o[i] * f.self + o_p[i] * f.other;
  }

  GK_HOST_DEVICE GK_INLINE void merge(const OnlineSoftmaxState& s) {
    if (s.stats.m == -INFINITY) return;
    const MergeFactors f = stats.merge(s.stats.m, s.stats.d);
#pragma unroll
    for (int i = 0; i < N; ++i) o[i] = o[i] * f.self + s.o[i] * f.other;
  }

  // Divides o by d in place (o = 0 for the empty state) and returns the log-sum-exp.
  GK_HOST_DEVICE GK_INLINE float normalize() {
    const float inv = stats.inv_denominator();
#pragma unroll
    for (int i = 0; i < N; ++i) o[i] *= inv;
    return stats.lse();
  }
};

}  // namespace gk
