// CUDA kernels + launchers: the fused denoising step (guidance, guidance rescale, x0, clip or
// dynamic thresholding, update, noise) and Philox Gaussian noise.
//
// Tiling: one thread per 16-byte chunk of the latents (4 fp32 or 8 fp16/bf16 elements), a
// grid-stride loop over the chunks, then over the < VEC leftover elements one by one. Each
// thread loads its chunk of every input with one 16-byte load, draws its noise with Philox
// (one call per group of 4 elements, csrc/core/philox.h, so the noise of element i depends
// only on (seed, offset, i), never on the grid) and stores 16 bytes of prev (and of x0).
// Traffic per element: 1-2 model-output reads, the sample, optionally history and noise, 1-2
// writes: bandwidth bound, no shared memory. One launch per step.
// Numerics: fp32 math with the coefficients of csrc/core/diffusion_coeffs.h; when pointers
// are not 16-byte aligned a 1-element variant runs (same results).
//
// Per-sample reduction (guidance_rescale, dynamic thresholding): one extra launch before the
// step, one block of kReduceThreads per batch item, writing {k_b, s_b} to p.per_sample.
//  - guidance rescale: per-thread float64 sums of c, c^2, g, g^2, then a shared-memory tree.
//  - quantile of |x0|: exact radix select on the bits of |x0| (non-negative floats order like
//    their bit patterns): four passes over the item, one per byte from the top, each building
//    a 256-bin shared histogram (shared atomics) of the elements that match the bytes chosen
//    so far, then one thread walks the bins to the one holding the wanted rank. That yields
//    the order statistic floor(r) bit-exactly, and the count of its equals; ceil(r) is the
//    same value when the rank stays among the equals, else one more pass takes the minimum
//    above it. x0 is recomputed from the inputs in every pass (no scratch memory), so the
//    pass reads each input 5 times per item: fine for the latents of image models (a few MB),
//    at the price of one SM per batch item.
#pragma once
#include <algorithm>
#include <cstdint>
#include "core/diffusion_step.h"
#include "core/philox.h"
#include "cuda/compat.cuh"

namespace gk::GK_CUDA_NS {

namespace diffusion_detail {
template <class T, int VEC>
struct alignas(sizeof(T) * VEC) Vec {
  T v[VEC];
};

template <class T, int VEC>
GK_DEVICE GK_INLINE void load(const T* base, int64_t i, float (&out)[VEC]) {
  const Vec<T, VEC> c = *reinterpret_cast<const Vec<T, VEC>*>(base + i);
#pragma unroll
  for (int k = 0; k < VEC; ++k) out[k] = to_float(c.v[k]);
}

template <class T, int VEC>
GK_DEVICE GK_INLINE void store(T* base, int64_t i, const float (&in)[VEC]) {
  Vec<T, VEC> c;
#pragma unroll
  for (int k = 0; k < VEC; ++k) c.v[k] = from_float<T>(in[k]);
  *reinterpret_cast<Vec<T, VEC>*>(base + i) = c;
}

// Noise of elements [i, i + VEC): whole Philox groups when VEC is a multiple of 4 (i is then
// a multiple of 4 too), one draw per element otherwise.
template <int VEC>
GK_DEVICE GK_INLINE void philox_noise(const DiffusionStepParams& p, int64_t i, float (&z)[VEC]) {
  if constexpr (VEC % 4 == 0) {
#pragma unroll
    for (int g = 0; g < VEC / 4; ++g) {
      const Gaussian4 q = philox_gaussian4(p.seed, p.offset, uint64_t(i >> 2) + g);
#pragma unroll
      for (int k = 0; k < 4; ++k) z[4 * g + k] = q.v[k];
    }
  } else {
#pragma unroll
    for (int k = 0; k < VEC; ++k) z[k] = philox_gaussian(p.seed, p.offset, uint64_t(i + k));
  }
}

// The batch item of each element of [i, i + VEC) (a chunk may straddle two items).
template <int VEC>
GK_DEVICE GK_INLINE void batch_items(const DiffusionStepParams& p, int64_t i, int64_t (&b)[VEC]) {
  const int64_t per = p.sample_size(), b0 = i / per, next = (b0 + 1) * per;
#pragma unroll
  for (int k = 0; k < VEC; ++k) b[k] = i + k < next ? b0 : (i + k) / per;
}

// One step over the elements [i, i + VEC).
template <class T, int VEC>
GK_DEVICE GK_INLINE void step_elements(const DiffusionStepParams& p, int64_t i) {
  float m[VEC], x[VEC], z[VEC], h[VEC], x0[VEC], prev[VEC];
  load<T, VEC>(static_cast<const T*>(p.model_uncond), i, m);
  if (p.model_cond) {
    float c[VEC];
    load<T, VEC>(static_cast<const T*>(p.model_cond), i, c);
#pragma unroll
    for (int k = 0; k < VEC; ++k) m[k] = guided(p, m[k], c[k]);
  }
  int64_t item[VEC];
  if (p.needs_reduction()) batch_items<VEC>(p, i, item);
  if (p.rescales()) {
#pragma unroll
    for (int k = 0; k < VEC; ++k) m[k] *= p.per_sample[2 * item[k]];
  }
  load<T, VEC>(static_cast<const T*>(p.sample), i, x);
#pragma unroll
  for (int k = 0; k < VEC; ++k) z[k] = 0.f, h[k] = 0.f, x0[k] = 0.f;
  if (p.has_noise) {
    if (p.noise) load<T, VEC>(static_cast<const T*>(p.noise), i, z);
    else philox_noise<VEC>(p, i, z);
  }
  if (p.history && p.ch != 0.f) load<T, VEC>(static_cast<const T*>(p.history), i, h);
  if (p.needs_x0()) {
#pragma unroll
    for (int k = 0; k < VEC; ++k) x0[k] = step_x0(p, x[k], m[k], z[k]);
    if (p.thresholds()) {
#pragma unroll
      for (int k = 0; k < VEC; ++k) x0[k] = threshold_x0(x0[k], p.per_sample[2 * item[k] + 1]);
    }
    if (p.pred_original) store<T, VEC>(static_cast<T*>(p.pred_original), i, x0);
  }
#pragma unroll
  for (int k = 0; k < VEC; ++k) prev[k] = step_prev(p, x[k], m[k], x0[k], h[k], z[k]);
  store<T, VEC>(static_cast<T*>(p.prev_sample), i, prev);
}
constexpr int kReduceThreads = 256;  // one histogram bin per thread in the radix select
constexpr int kRadixBits = 8;

// Unthresholded x0 of element e (the reduction recomputes it per pass).
template <class T>
GK_DEVICE GK_INLINE float x0_of(const DiffusionStepParams& p, int64_t e, float k_scale) {
  float m = to_float(static_cast<const T*>(p.model_uncond)[e]);
  if (p.model_cond) m = guided(p, m, to_float(static_cast<const T*>(p.model_cond)[e]));
  m *= k_scale;
  float z = 0.f;
  if (p.has_noise && p.pz != 0.f)
    z = p.noise ? to_float(static_cast<const T*>(p.noise)[e]) : philox_gaussian(p.seed, p.offset, uint64_t(e));
  return step_x0(p, to_float(static_cast<const T*>(p.sample)[e]), m, z);
}

GK_DEVICE GK_INLINE uint32_t abs_bits(float v) { return float_as_bits(v) & 0x7fffffffu; }
}  // namespace diffusion_detail

// kernels

// The per-sample scalars {k_b, s_b} of batch item blockIdx.x (see the header comment).
template <class T>
__global__ void __launch_bounds__(diffusion_detail::kReduceThreads) diffusion_reduce_kernel(const DiffusionStepParams p) {
  using namespace diffusion_detail;
  constexpr int kBins = 1 << kRadixBits;
  static_assert(kBins == kReduceThreads, "the bin walk and the histogram reset use one thread per bin");
  __shared__ double sums[4][kReduceThreads];
  __shared__ unsigned hist[kBins];
  __shared__ unsigned prefix, mask, min_above;
  __shared__ int64_t rank;
  __shared__ unsigned count_eq;
  __shared__ int has_nan;
  __shared__ float k_scale;
  const int tid = threadIdx.x;
  const int64_t per = p.sample_size(), base = int64_t(blockIdx.x) * per;
  if (tid == 0) k_scale = 1.f;
  if (p.rescales()) {
    double sc = 0, scc = 0, sg = 0, sgg = 0;
    for (int64_t e = base + tid; e < base + per; e += kReduceThreads) {
      const float c = to_float(static_cast<const T*>(p.model_cond)[e]);
      const float g = guided(p, to_float(static_cast<const T*>(p.model_uncond)[e]), c);
      sc += c, scc += double(c) * c, sg += g, sgg += double(g) * g;
    }
    sums[0][tid] = sc, sums[1][tid] = scc, sums[2][tid] = sg, sums[3][tid] = sgg;
    __syncthreads();
    for (int half = kReduceThreads / 2; half > 0; half /= 2) {
      if (tid < half)
        for (int q = 0; q < 4; ++q) sums[q][tid] += sums[q][tid + half];
      __syncthreads();
    }
    if (tid == 0) {
      k_scale = rescale_factor(p.guidance_rescale, sums[0][0], sums[1][0], sums[2][0], sums[3][0], per);
      p.per_sample[2 * blockIdx.x] = k_scale;
    }
  }
  __syncthreads();
  if (!p.thresholds()) return;
  const float ks = k_scale;
  const QuantileRank r = quantile_rank(p.threshold_ratio, per);
  if (tid == 0) prefix = 0, mask = 0, rank = r.lo, has_nan = 0, min_above = 0xffffffffu;
  for (int shift = 32 - kRadixBits; shift >= 0; shift -= kRadixBits) {
    hist[tid] = 0;
    __syncthreads();
    const uint32_t want = prefix, sel = mask;
    for (int64_t e = base + tid; e < base + per; e += kReduceThreads) {
      const uint32_t bits = abs_bits(x0_of<T>(p, e, ks));
      if (bits > 0x7f800000u) atomicOr(&has_nan, 1);
      if ((bits & sel) == want) atomicAdd(&hist[(bits >> shift) & (kBins - 1)], 1u);
    }
    __syncthreads();
    if (tid == 0) {
      int64_t below = 0;
      int d = 0;
      while (d < kBins - 1 && below + hist[d] <= rank) below += hist[d++];
      rank -= below;
      prefix |= uint32_t(d) << shift;
      mask |= uint32_t(kBins - 1) << shift;
      count_eq = hist[d];
    }
    __syncthreads();
  }
  const float v_lo = bits_as_float(prefix);
  float v_hi = v_lo;
  if (r.hi != r.lo && rank + 1 >= int64_t(count_eq)) {  // ceil(r) lies above v_lo: the next value
    const uint32_t lo_bits = prefix;
    unsigned local = 0xffffffffu;
    for (int64_t e = base + tid; e < base + per; e += kReduceThreads) {
      const uint32_t bits = abs_bits(x0_of<T>(p, e, ks));
      if (bits > lo_bits && bits < local) local = unsigned(bits);
    }
    atomicMin(&min_above, local);
    __syncthreads();
    v_hi = bits_as_float(min_above);
  }
  if (tid == 0)
    p.per_sample[2 * blockIdx.x + 1] =
        has_nan ? bits_as_float(0x7fc00000u) : threshold_from_order_stats(v_lo, v_hi, r.weight, p.threshold_max);
}

template <class T, int VEC>
__global__ void __launch_bounds__(256) diffusion_step_kernel(const DiffusionStepParams p) {
  const int64_t chunks = p.n / VEC, total = chunks + (p.n - chunks * VEC);
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    if (idx < chunks) diffusion_detail::step_elements<T, VEC>(p, idx * VEC);
    else diffusion_detail::step_elements<T, 1>(p, chunks * VEC + (idx - chunks));
  }
}

template <class T>
__global__ void __launch_bounds__(256) gaussian_noise_kernel(T* out, int64_t n, uint64_t seed, uint64_t offset) {
  const int64_t groups = (n + 3) / 4;
  for (int64_t g = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; g < groups; g += int64_t(gridDim.x) * blockDim.x) {
    const Gaussian4 q = philox_gaussian4(seed, offset, uint64_t(g));
#pragma unroll
    for (int k = 0; k < 4; ++k)
      if (4 * g + k < n) out[4 * g + k] = from_float<T>(q.v[k]);
  }
}

// launchers

namespace diffusion_detail {
constexpr int kThreads = 256;
inline unsigned grid_for(int64_t work) {
  // enough blocks to fill any current GPU several times over; the grid-stride loop does the rest
  return unsigned(std::min<int64_t>((work + kThreads - 1) / kThreads, int64_t(1) << 16));
}
}  // namespace diffusion_detail

/// Launches one fused step (after the per-sample reduction when guidance rescale or dynamic
/// thresholding asks for it). Returns a cudaError_t as int; launches nothing for n == 0.
template <class T>
int diffusion_step(const DiffusionStepParams& p, void* stream) {
  using namespace diffusion_detail;
  constexpr int kVec = 16 / sizeof(T);
  if (p.n == 0) return 0;
  if (p.needs_reduction()) {
    auto reduce = diffusion_reduce_kernel<T>;
    const int err = GK_LAUNCH_KERNEL(reduce, dim3(unsigned(p.batch)), dim3(kReduceThreads), 0, stream, p);
    if (err != 0) return err;
  }
  auto aligned = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; };
  const bool vectorised = aligned(p.model_uncond) && aligned(p.model_cond) && aligned(p.sample) &&
                          aligned(p.history) && aligned(p.noise) && aligned(p.prev_sample) &&
                          aligned(p.pred_original);
  if (vectorised) {
    auto kernel = diffusion_step_kernel<T, kVec>;
    return GK_LAUNCH_KERNEL(kernel, dim3(grid_for(p.n / kVec + kVec)), dim3(kThreads), 0, stream, p);
  }
  auto kernel = diffusion_step_kernel<T, 1>;
  return GK_LAUNCH_KERNEL(kernel, dim3(grid_for(p.n)), dim3(kThreads), 0, stream, p);
}

/// Fills out[0, n) with the Philox Gaussians of (seed, offset).
template <class T>
int gaussian_noise(T* out, int64_t n, uint64_t seed, uint64_t offset, void* stream) {
  using namespace diffusion_detail;
  if (n == 0) return 0;
  auto kernel = gaussian_noise_kernel<T>;
  return GK_LAUNCH_KERNEL(kernel, dim3(grid_for((n + 3) / 4)), dim3(kThreads), 0, stream, out, n, seed, offset);
}

}  // namespace gk::GK_CUDA_NS
