// Register-fragment helpers shared by the tensor-core kernels (flash attention, decode): the
// typed m16n8k16 MMA, packing two fp32 values into one 16-bit pair, and reductions over the 4
// lanes (a quad) that hold one row of an MMA accumulator fragment (PTX ISA fragment layout: row
// g = lane / 4 lives in lanes 4g..4g+3).
#pragma once
#include <cstdint>
#include <type_traits>

#include "cuda/compat.cuh"
#include "cuda/ptx.cuh"

namespace gk::GK_CUDA_NS::mma_fragments {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// One m16n8k16 MMA with fp32 accumulation, for the element type T (fp16_t or bf16_t).
template <class T>
GK_DEVICE GK_INLINE void mma(float (&acc)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  const uint32_t b[2] = {b0, b1};
  if constexpr (std::is_same_v<T, bf16_t>) ptx::mma_m16n8k16_bf16(acc, a, b, acc);
  else ptx::mma_m16n8k16_f16(acc, a, b, acc);
}

// Two fp32 values as one packed pair of T, the lower column in the low half.
template <class T>
GK_DEVICE GK_INLINE uint32_t pack(float lo, float hi) {
  if constexpr (std::is_same_v<T, bf16_t>) return ptx::pack_float2_to_bf162(lo, hi);
  else return ptx::pack_float2_to_half2(lo, hi);
}

// Max / sum over the 4 lanes of a quad.
GK_DEVICE GK_INLINE float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
GK_DEVICE GK_INLINE float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

}  // namespace gk::GK_CUDA_NS::mma_fragments
