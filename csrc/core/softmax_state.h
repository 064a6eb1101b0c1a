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

// The rescale rule, written once for a float and for a SIMD vector of them (one state per lane):
// a state with max m meets scores (or a second state) with max m2. Both sides are re-expressed
// against m_new = max(m, m2): the exponent base is m_new, or 0 while m_new = -inf (nothing seen
// yet), so that exp(s - base) of masked scores is exp(-inf) = 0 rather than exp(-inf + inf) =
// NaN; the old accumulators (d and o) are multiplied by self = exp(m - base). Then
//   d_new = d * self + sum_j exp(s_j - base)   (or + d2 * exp(m2 - base) for a state).
// Ops supplies max (NaN in either operand must reach the result or the base), exp and
// select_empty(m_new, zero, x) = (m_new == -inf ? zero : x): see ScalarSoftmaxOps, and the
// SIMD ops of the CPU attention kernels.
template <class V>
struct SoftmaxRescale {
  V m_new, base, self;
};
template <class Ops, class V>
GK_HOST_DEVICE GK_INLINE SoftmaxRescale<V> softmax_rescale(V m, V m2) {
  const V m_new = Ops::max(m, m2);
  const V base = Ops::select_empty(m_new, Ops::zero(), m_new);
  return {m_new, base, Ops::exp(m - base)};
}

struct ScalarSoftmaxOps {
  // `a > b` is false when either is NaN, so a NaN on either side lands in the result or in the
  // exponent and propagates; +inf gives exp(inf - inf) = NaN on purpose.
  GK_HOST_DEVICE static float max(float a, float b) { return a > b ? a : b; }
  GK_HOST_DEVICE static float exp(float x) { return expf(x); }
  GK_HOST_DEVICE static float zero() { return 0.f; }
  GK_HOST_DEVICE static float select_empty(float m, float zero, float x) { return m == -INFINITY ? zero : x; }
};

// Folds statistics (m2, d2) into (m, d) and returns the rescale factors. An empty other side
// returns {1, 0} and the caller must skip its accumulator (0 * NaN would still be NaN).
GK_HOST_DEVICE GK_INLINE MergeFactors merge_softmax_stats(float& m, float& d, float m2, float d2) {
  if (m2 == -INFINITY) return {1.f, 0.f};
  if (m == -INFINITY) {  // the first non-empty side, taken as is; m2 = +inf poisons d as the
    m = m2;                // general rule below would (exp(inf - inf)), so the LSE becomes NaN
    d = m2 == INFINITY ? NAN : d2;
    return {0.f, 1.f};
  }
  // Both sides non-empty: base = m_new (or NaN), the rule of softmax_rescale.
  const SoftmaxRescale<float> r = softmax_rescale<ScalarSoftmaxOps>(m, m2);
  const float other = expf(m2 - r.base);
  d = d * r.self + d2 * other;
  m = r.m_new;
  return {r.self, other};
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
