// CUDA kernel + launcher: merge of partial attention states (log-sum-exp weighted combine).
//
// Tiling: one thread per 16-byte chunk of one output row (8 fp16/bf16 or 4 fp32 elements), a
// grid-stride loop over (row, chunk). Each thread folds the row's N log-sum-exps into
// SoftmaxStats (csrc/core, the same code as the CPU kernel), then streams its chunk of every
// non-empty partial with one 16-byte load each and writes 16 bytes. Traffic per row is
// N * D * sizeof(T) read + D * sizeof(T) written (+ 4 N bytes of LSE, shared through L1 by
// the row's D / 8 threads): bandwidth bound, no shared memory needed.
// Numerics: fp32 accumulation; the same special-value rules as csrc/core/softmax_state.h.
// When head_dim, pointers or strides do not allow 16-byte chunks, a 1-element variant runs.
#pragma once
#include <algorithm>
#include <cstdint>
#include "core/merge_params.h"
#include "core/softmax_state.h"
#include "cuda/compat.cuh"

namespace gk::GK_CUDA_NS {

template <class T, int VEC>
struct alignas(sizeof(T) * VEC) Chunk {
  T v[VEC];
};

// Partials of type T, output of type TOut (the merge op: TOut = T; decode's split-KV combine:
// fp32 partials into the output dtype).
template <class T, class TOut, int VEC>
__global__ void __launch_bounds__(256) merge_attention_states_kernel(const MergeStatesParams p) {
  const int64_t chunks_per_row = p.head_dim / VEC;
  const int64_t total = p.rows() * chunks_per_row;
  const int64_t S = p.seqlen, H = p.heads;
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = idx / chunks_per_row, c = idx - r * chunks_per_row;
    const int64_t b = r / (S * H), s = (r / H) % S, h = r % H;
    const int64_t lse_off_first = b * p.lse_first_stride[0] + h * p.lse_first_stride[1] + s * p.lse_first_stride[2];
    const int64_t lse_off_rest = b * p.lse_rest_stride[0] + h * p.lse_rest_stride[1] + s * p.lse_rest_stride[2];
    auto lse_of = [&](int64_t i) {
      return i == 0 ? p.lse_first[lse_off_first] : p.lse_rest[(i - 1) * p.lse_partial_stride + lse_off_rest];
    };

    SoftmaxStats stats;
    for (int64_t i = 0; i < p.num_partials; ++i) stats.merge_partial(lse_of(i));
    const float inv_d = stats.inv_denominator();

    const int64_t out_off_first = b * p.out_first_stride[0] + s * p.out_first_stride[1] + h * p.out_first_stride[2] + c * VEC;
    const int64_t out_off_rest = b * p.out_rest_stride[0] + s * p.out_rest_stride[1] + h * p.out_rest_stride[2] + c * VEC;
    float acc[VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) acc[k] = 0.f;
    for (int64_t i = 0; i < p.num_partials; ++i) {
      const float lse = lse_of(i);
      if (lse == -INFINITY) continue;  // empty partial: its output is never read
      const float w = stats.partial_weight(lse, inv_d);
      const T* src = i == 0 ? static_cast<const T*>(p.out_first) + out_off_first
                            : static_cast<const T*>(p.out_rest) + (i - 1) * p.out_partial_stride + out_off_rest;
      const Chunk<T, VEC> x = *reinterpret_cast<const Chunk<T, VEC>*>(src);
#pragma unroll
      for (int k = 0; k < VEC; ++k) acc[k] += w * to_float(x.v[k]);
    }
    Chunk<TOut, VEC> y;
#pragma unroll
    for (int k = 0; k < VEC; ++k) y.v[k] = from_float<TOut>(acc[k]);
    *reinterpret_cast<Chunk<TOut, VEC>*>(static_cast<TOut*>(p.dst_out) + r * p.head_dim + c * VEC) = y;
    if (c == 0 && p.dst_lse) p.dst_lse[(b * H + h) * S + s] = stats.lse();
  }
}

// Launcher for T partials into a TOut output. Returns a cudaError_t as int; launches nothing for
// an empty problem.
template <class T, class TOut>
int merge_states(const MergeStatesParams& p, void* stream) {
  constexpr int kVec = 16 / sizeof(T);  // one 16-byte load per partial chunk
  constexpr int kThreads = 256;
  if (p.rows() == 0 || p.head_dim == 0) return 0;
  auto aligned = [](const void* ptr, size_t bytes) { return reinterpret_cast<uintptr_t>(ptr) % bytes == 0; };
  bool vectorised = p.head_dim % kVec == 0 && aligned(p.out_first, 16) && aligned(p.dst_out, kVec * sizeof(TOut)) &&
                    (p.num_partials < 2 || (aligned(p.out_rest, 16) && p.out_partial_stride % kVec == 0));
  for (int k = 0; k < 3; ++k)
    vectorised = vectorised && p.out_first_stride[k] % kVec == 0 && (p.num_partials < 2 || p.out_rest_stride[k] % kVec == 0);
  const int vec = vectorised ? kVec : 1;
  const int64_t total = p.rows() * (p.head_dim / vec);
  // Enough blocks to fill any current GPU several times over; the grid-stride loop does the rest.
  const int64_t blocks = std::min<int64_t>((total + kThreads - 1) / kThreads, int64_t(1) << 16);
  if (vectorised) {
    auto kernel = merge_attention_states_kernel<T, TOut, kVec>;
    return GK_LAUNCH_KERNEL(kernel, dim3(unsigned(blocks)), dim3(kThreads), 0, stream, p);
  }
  auto kernel = merge_attention_states_kernel<T, TOut, 1>;
  return GK_LAUNCH_KERNEL(kernel, dim3(unsigned(blocks)), dim3(kThreads), 0, stream, p);
}

// The merge op.
template <class T>
int merge_attention_states(const MergeStatesParams& p, void* stream) {
  return merge_states<T, T>(p, stream);
}

}  // namespace gk::GK_CUDA_NS
