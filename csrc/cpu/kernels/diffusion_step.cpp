// CPU kernel: the fused denoising step (guidance, x0, clip, update, noise) and Philox noise.
//
// Work: the latents are cut into blocks of kBlock elements, split statically across OpenMP
// threads. Per block, in-kernel noise is first drawn into a small stack buffer (Philox per
// group of 4 elements, csrc/core/philox.h, the same code as the CUDA kernel, so the noise is
// bit-identical), then one SIMD pass reads each input once and writes prev (and x0) once.
// Traffic: (1 or 2 model-output + sample [+ history] [+ noise]) reads and 1-2 writes per
// element; the op is memory bound without noise and Box-Muller bound with it.
// Numerics: fp32 math, coefficients from csrc/core/diffusion_coeffs.h (float64, rounded once).
// Compiled once per ISA level (GK_CPU_ISA_NS), see csrc/cpu/isa.h.
#include "core/diffusion_step.h"
#include "core/philox.h"
#include "cpu/kernels.h"
#include "cpu/simd.h"

namespace gk::cpu::GK_CPU_ISA_NS {

namespace {
constexpr int64_t kBlock = 512;  // elements per work item; a multiple of 4 (Philox groups) and of every SIMD width
constexpr int64_t kParallelThreshold = 1 << 15;

// Fills z[0, len) with the Gaussians of elements [first, first + len), first % 4 == 0.
// Structure of arrays, so that the compiler vectorises the Philox rounds and the Box-Muller
// transform (same IEEE operations per lane: the same bits as the scalar and CUDA code).
void draw_gaussians(uint64_t seed, uint64_t offset, int64_t first, int64_t len, float* z) {
  constexpr int kGroups = kBlock / 4;
  alignas(64) uint32_t w[4][kGroups];
  const int groups = int((len + 3) / 4);
  const uint64_t g0 = uint64_t(first) >> 2;
  for (int g = 0; g < groups; ++g) {
    const Philox4x32Result r = philox4x32_10(uint32_t(g0 + g), uint32_t((g0 + g) >> 32), uint32_t(offset),
                                             uint32_t(offset >> 32), uint32_t(seed), uint32_t(seed >> 32));
    for (int k = 0; k < 4; ++k) w[k][g] = r.v[k];
  }
  alignas(64) float zz[4][kGroups];
  for (int g = 0; g < groups; ++g) philox_detail::box_muller(w[0][g], w[1][g], zz[0][g], zz[1][g]);
  for (int g = 0; g < groups; ++g) philox_detail::box_muller(w[2][g], w[3][g], zz[2][g], zz[3][g]);
  for (int64_t i = 0; i < len; ++i) z[i] = zz[i & 3][i >> 2];
}

template <class T>
void step_block(const DiffusionStepParams& p, int64_t i0, int64_t len) {
  alignas(64) float zbuf[kBlock];
  const bool cfg = p.model_cond != nullptr, has_h = p.history != nullptr && p.ch != 0.f;
  const bool has_z = p.has_noise, z_from_tensor = has_z && p.noise != nullptr;
  const bool want_x0 = p.needs_x0();
  if (has_z && !z_from_tensor) draw_gaussians(p.seed, p.offset, i0, len, zbuf);
  const T* u = static_cast<const T*>(p.model_uncond) + i0;
  const T* c = cfg ? static_cast<const T*>(p.model_cond) + i0 : nullptr;
  const T* x = static_cast<const T*>(p.sample) + i0;
  const T* h = has_h ? static_cast<const T*>(p.history) + i0 : nullptr;
  const T* zt = z_from_tensor ? static_cast<const T*>(p.noise) + i0 : nullptr;
  T* out = static_cast<T*>(p.prev_sample) + i0;
  T* x0_out = p.pred_original ? static_cast<T*>(p.pred_original) + i0 : nullptr;

  constexpr int W = VecF::kWidth;
  const VecF g = VecF::set1(p.guidance), neg1 = VecF::set1(-1.f);
  const VecF px = VecF::set1(p.px), pm = VecF::set1(p.pm), pz = VecF::set1(p.pz);
  const VecF cx = VecF::set1(p.cx), cm = VecF::set1(p.cm), c0 = VecF::set1(p.c0), ch = VecF::set1(p.ch),
             cz = VecF::set1(p.cz);
  const VecF neg_hi = VecF::set1(-p.clip);
  int64_t i = 0;
  for (; i + W <= len; i += W) {
    VecF m = VecF::load(u + i);
    if (cfg) m = fmadd(g, fmadd(m, neg1, VecF::load(c + i)), m);  // u + w (c - u)
    const VecF xv = VecF::load(x + i);
    const VecF z = !has_z ? VecF::zero() : z_from_tensor ? VecF::load(zt + i) : VecF::load(zbuf + i);
    VecF acc = cx * xv;
    acc = fmadd(cm, m, acc);
    if (want_x0) {
      VecF x0 = fmadd(pm, m, px * xv);
      if (has_z) x0 = fmadd(pz, z, x0);
      if (p.clip > 0.f) x0 = max(max(x0, neg_hi) * neg1, neg_hi) * neg1;  // min(max(x0, -c), c)
      acc = fmadd(c0, x0, acc);
      if (x0_out) x0.store(x0_out + i);
    }
    if (has_h) acc = fmadd(ch, VecF::load(h + i), acc);
    if (has_z) acc = fmadd(cz, z, acc);
    acc.store(out + i);
  }
  for (; i < len; ++i) {
    const float uu = to_float(u[i]);
    const float m = cfg ? guided(p, uu, to_float(c[i])) : uu;
    const float xv = to_float(x[i]);
    const float z = !has_z ? 0.f : z_from_tensor ? to_float(zt[i]) : zbuf[i];
    const float x0 = want_x0 ? step_x0(p, xv, m, z) : 0.f;
    if (x0_out) x0_out[i] = from_float<T>(x0);
    out[i] = from_float<T>(step_prev(p, xv, m, x0, has_h ? to_float(h[i]) : 0.f, z));
  }
}
}  // namespace

template <class T>
void diffusion_step(const DiffusionStepParams& p, int num_threads) {
  const int64_t blocks = (p.n + kBlock - 1) / kBlock;
#pragma omp parallel for num_threads(num_threads) schedule(static) if (p.n > kParallelThreshold)
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t i0 = b * kBlock;
    step_block<T>(p, i0, p.n - i0 < kBlock ? p.n - i0 : kBlock);
  }
}

template <class T>
void gaussian_noise(T* out, int64_t n, uint64_t seed, uint64_t offset, int num_threads) {
  const int64_t blocks = (n + kBlock - 1) / kBlock;
#pragma omp parallel for num_threads(num_threads) schedule(static) if (n > kParallelThreshold)
  for (int64_t b = 0; b < blocks; ++b) {
    alignas(64) float z[kBlock];
    const int64_t i0 = b * kBlock, len = n - i0 < kBlock ? n - i0 : kBlock;
    draw_gaussians(seed, offset, i0, len, z);
    for (int64_t i = 0; i < len; ++i) out[i0 + i] = from_float<T>(z[i]);
  }
}

template void diffusion_step<float>(const DiffusionStepParams&, int);
template void diffusion_step<fp16_t>(const DiffusionStepParams&, int);
template void diffusion_step<bf16_t>(const DiffusionStepParams&, int);
template void gaussian_noise<float>(float*, int64_t, uint64_t, uint64_t, int);
template void gaussian_noise<fp16_t>(fp16_t*, int64_t, uint64_t, uint64_t, int);
template void gaussian_noise<bf16_t>(bf16_t*, int64_t, uint64_t, uint64_t, int);

}  // namespace gk::cpu::GK_CPU_ISA_NS
