// CUDA kernels + launchers: the fused denoising step (guidance, x0, clip, update, noise) and
// Philox Gaussian noise.
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
    if (p.pred_original) store<T, VEC>(static_cast<T*>(p.pred_original), i, x0);
  }
#pragma unroll
  for (int k = 0; k < VEC; ++k) prev[k] = step_prev(p, x[k], m[k], x0[k], h[k], z[k]);
  store<T, VEC>(static_cast<T*>(p.prev_sample), i, prev);
}
}  // namespace diffusion_detail

// kernels

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

/// Launches one fused step. Returns a cudaError_t as int; launches nothing for n == 0.
template <class T>
int diffusion_step(const DiffusionStepParams& p, void* stream) {
  using namespace diffusion_detail;
  constexpr int kVec = 16 / sizeof(T);
  if (p.n == 0) return 0;
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
