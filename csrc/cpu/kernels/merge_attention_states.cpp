// CPU kernel: merge of partial attention states (log-sum-exp weighted combine).
//
// Work: one row (b, s, h) at a time, rows split statically across OpenMP threads. Per row,
// pass 1 folds the partials' log-sum-exps into SoftmaxStats (csrc/core, shared with the CUDA
// kernel), pass 2 streams each non-empty partial's head_dim vector once, SIMD, fp32
// accumulation, and writes the output once. Traffic: N * D * sizeof(T) read + D * sizeof(T)
// written per row; the op is memory bound, so the arithmetic is kept simple.
// Compiled once per ISA level (GK_CPU_ISA_NS), see csrc/cpu/isa.h.
#include <cmath>
#include "core/softmax_state.h"
#include "cpu/kernels.h"
#include "cpu/simd.h"

namespace gk::cpu::GK_CPU_ISA_NS {

namespace {
template <class T>
void merge_row(const MergeStatesParams& p, int64_t b, int64_t s, int64_t h, T* dst, float* dst_lse) {
  const int64_t D = p.head_dim, N = p.num_partials;
  auto lse_of = [&](int64_t i) {
    const float* base = i == 0 ? p.lse_first : p.lse_rest + (i - 1) * p.lse_partial_stride;
    const int64_t* st = i == 0 ? p.lse_first_stride : p.lse_rest_stride;
    return base[b * st[0] + h * st[1] + s * st[2]];
  };
  auto out_of = [&](int64_t i) {
    const T* base = static_cast<const T*>(i == 0 ? p.out_first : p.out_rest) + (i == 0 ? 0 : (i - 1) * p.out_partial_stride);
    const int64_t* st = i == 0 ? p.out_first_stride : p.out_rest_stride;
    return base + b * st[0] + s * st[1] + h * st[2];
  };

  SoftmaxStats stats;
  for (int64_t i = 0; i < N; ++i) stats.merge_partial(lse_of(i));
  // NaN statistics (a NaN or +inf lse) make inv_d NaN, hence every weight and the output NaN.
  const float inv_d = stats.inv_denominator();
  if (dst_lse) *dst_lse = stats.lse();

  constexpr int W = VecF::kWidth;
  int64_t d0 = 0;
  // Blocks of 4 vectors keep 4 independent accumulators in flight.
  for (; d0 + 4 * W <= D; d0 += 4 * W) {
    VecF acc[4] = {VecF::zero(), VecF::zero(), VecF::zero(), VecF::zero()};
    for (int64_t i = 0; i < N; ++i) {
      const float lse = lse_of(i);
      if (lse == -INFINITY) continue;
      const VecF w = VecF::set1(stats.partial_weight(lse, inv_d));
      const T* x = out_of(i) + d0;
      for (int k = 0; k < 4; ++k) acc[k] = fmadd(w, VecF::load(x + k * W), acc[k]);
    }
    for (int k = 0; k < 4; ++k) acc[k].store(dst + d0 + k * W);
  }
  for (; d0 + W <= D; d0 += W) {
    VecF acc = VecF::zero();
    for (int64_t i = 0; i < N; ++i) {
      const float lse = lse_of(i);
      if (lse == -INFINITY) continue;
      acc = fmadd(VecF::set1(stats.partial_weight(lse, inv_d)), VecF::load(out_of(i) + d0), acc);
    }
    acc.store(dst + d0);
  }
  for (; d0 < D; ++d0) {
    float acc = 0.f;
    for (int64_t i = 0; i < N; ++i) {
      const float lse = lse_of(i);
      if (lse == -INFINITY) continue;
      acc += stats.partial_weight(lse, inv_d) * to_float(out_of(i)[d0]);
    }
    dst[d0] = from_float<T>(acc);
  }
}
}  // namespace

template <class T>
void merge_attention_states(const MergeStatesParams& p, int num_threads) {
  const int64_t rows = p.rows();
  const int64_t S = p.seqlen, H = p.heads, D = p.head_dim;
  T* dst = static_cast<T*>(p.dst_out);
#pragma omp parallel for num_threads(num_threads) schedule(static) if (rows * D * p.num_partials > 32768)
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t b = r / (S * H), s = (r / H) % S, h = r % H;
    float* dst_lse = p.dst_lse ? p.dst_lse + (b * H + h) * S + s : nullptr;
    merge_row<T>(p, b, s, h, dst + r * D, dst_lse);
  }
}

template void merge_attention_states<float>(const MergeStatesParams&, int);
template void merge_attention_states<fp16_t>(const MergeStatesParams&, int);
template void merge_attention_states<bf16_t>(const MergeStatesParams&, int);

}  // namespace gk::cpu::GK_CPU_ISA_NS
