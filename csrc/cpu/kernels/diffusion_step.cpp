// CPU kernel: the fused denoising step (guidance, guidance rescale, x0, clip or dynamic
// thresholding, update, noise) and Philox noise.
//
// Work: the latents are cut into blocks of kBlock elements, split statically across OpenMP
// threads. Per block, in-kernel noise is first drawn into a small stack buffer (Philox per
// group of 4 elements, csrc/core/philox.h, the same code as the CUDA kernel, so the noise is
// bit-identical), then one SIMD pass reads each input once and writes prev (and x0) once; a
// block that straddles two batch items is processed as two segments (per-sample scalars).
// Traffic: (1 or 2 model-output + sample [+ history] [+ noise]) reads and 1-2 writes per
// element; the op is memory bound without noise and Box-Muller bound with it.
// Per-sample reductions (guidance_rescale, dynamic thresholding) run first, one batch item per
// thread (or all threads on one item when the batch is small): the float64 sums of c, c^2, g,
// g^2 per block (partials combined in a fixed order, so the result does not depend on the
// thread count), then |x0| of the item into a scratch buffer and an exact selection of the two
// order statistics (std::nth_element, then the minimum above it); this costs one extra read of
// the inputs (two with both options) and O(n / batch) scratch per thread.
// Numerics: fp32 math, coefficients from csrc/core/diffusion_coeffs.h (float64, rounded once).
// Compiled once per ISA level (GK_CPU_ISA_NS), see csrc/cpu/isa.h.
#include <algorithm>
#include <vector>

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

// Elements [i0, i0 + len) of one batch item, with its scalars: m scale k and threshold s (1
// and 0 when unused); z holds the block's noise from element i0 on.
template <class T>
void step_segment(const DiffusionStepParams& p, int64_t i0, int64_t len, const float* zbuf, float k_scale,
                  float thr) {
  const bool cfg = p.model_cond != nullptr, has_h = p.history != nullptr && p.ch != 0.f;
  const bool has_z = p.has_noise, z_from_tensor = has_z && p.noise != nullptr;
  const bool want_x0 = p.needs_x0(), rescale = p.rescales(), threshold = p.thresholds();
  const T* u = static_cast<const T*>(p.model_uncond) + i0;
  const T* c = cfg ? static_cast<const T*>(p.model_cond) + i0 : nullptr;
  const T* x = static_cast<const T*>(p.sample) + i0;
  const T* h = has_h ? static_cast<const T*>(p.history) + i0 : nullptr;
  const T* zt = z_from_tensor ? static_cast<const T*>(p.noise) + i0 : nullptr;
  T* out = static_cast<T*>(p.prev_sample) + i0;
  T* x0_out = p.pred_original ? static_cast<T*>(p.pred_original) + i0 : nullptr;

  constexpr int W = VecF::kWidth;
  const VecF g = VecF::set1(p.guidance), neg1 = VecF::set1(-1.f), ks = VecF::set1(k_scale);
  const VecF px = VecF::set1(p.px), pm = VecF::set1(p.pm), pz = VecF::set1(p.pz);
  const VecF cx = VecF::set1(p.cx), cm = VecF::set1(p.cm), c0 = VecF::set1(p.c0), ch = VecF::set1(p.ch),
             cz = VecF::set1(p.cz);
  const VecF neg_hi = VecF::set1(-p.clip), neg_s = VecF::set1(-thr), sv = VecF::set1(thr);
  int64_t i = 0;
  for (; i + W <= len; i += W) {
    VecF m = VecF::load(u + i);
    if (cfg) m = fmadd(g, fmadd(m, neg1, VecF::load(c + i)), m);  // u + w (c - u)
    if (rescale) m = m * ks;
    const VecF xv = VecF::load(x + i);
    const VecF z = !has_z ? VecF::zero() : z_from_tensor ? VecF::load(zt + i) : VecF::load(zbuf + i);
    VecF acc = cx * xv;
    acc = fmadd(cm, m, acc);
    if (want_x0) {
      VecF x0 = fmadd(pm, m, px * xv);
      if (has_z) x0 = fmadd(pz, z, x0);
      if (p.clip > 0.f) x0 = max(max(x0, neg_hi) * neg1, neg_hi) * neg1;  // min(max(x0, -c), c)
      if (threshold) x0 = min(max(x0, neg_s), sv) / sv;                 // clamp(x0, -s, s) / s
      acc = fmadd(c0, x0, acc);
      if (x0_out) x0.store(x0_out + i);
    }
    if (has_h) acc = fmadd(ch, VecF::load(h + i), acc);
    if (has_z) acc = fmadd(cz, z, acc);
    acc.store(out + i);
  }
  for (; i < len; ++i) {
    const float uu = to_float(u[i]);
    float m = cfg ? guided(p, uu, to_float(c[i])) : uu;
    if (rescale) m *= k_scale;
    const float xv = to_float(x[i]);
    const float z = !has_z ? 0.f : z_from_tensor ? to_float(zt[i]) : zbuf[i];
    float x0 = want_x0 ? step_x0(p, xv, m, z) : 0.f;
    if (threshold) x0 = threshold_x0(x0, thr);
    if (x0_out) x0_out[i] = from_float<T>(x0);
    out[i] = from_float<T>(step_prev(p, xv, m, x0, has_h ? to_float(h[i]) : 0.f, z));
  }
}

template <class T>
void step_block(const DiffusionStepParams& p, int64_t i0, int64_t len) {
  alignas(64) float zbuf[kBlock];
  if (p.has_noise && p.noise == nullptr) draw_gaussians(p.seed, p.offset, i0, len, zbuf);
  if (!p.needs_reduction()) {
    step_segment<T>(p, i0, len, zbuf, 1.f, 0.f);
    return;
  }
  const int64_t per = p.sample_size();
  for (int64_t s0 = i0; s0 < i0 + len;) {
    const int64_t b = s0 / per, s1 = std::min(i0 + len, (b + 1) * per);
    step_segment<T>(p, s0, s1 - s0, zbuf + (s0 - i0), p.rescales() ? p.per_sample[2 * b] : 1.f,
                    p.thresholds() ? p.per_sample[2 * b + 1] : 0.f);
    s0 = s1;
  }
}

// Float64 sums of c, c^2, g, g^2 over elements [j0, j0 + len), in kLanes interleaved partial
// sums combined in a fixed order (so the loop vectorises without reassociation and the result
// does not depend on the ISA's vector width).
template <class T>
void rescale_sums(const DiffusionStepParams& p, int64_t j0, int64_t len, double* out) {
  constexpr int kLanes = 8;
  const T* u = static_cast<const T*>(p.model_uncond) + j0;
  const T* c = static_cast<const T*>(p.model_cond) + j0;
  double acc[4][kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= len; i += kLanes)
    for (int k = 0; k < kLanes; ++k) {
      const float cc = to_float(c[i + k]), gg = guided(p, to_float(u[i + k]), cc);
      acc[0][k] += cc, acc[1][k] += double(cc) * cc, acc[2][k] += gg, acc[3][k] += double(gg) * gg;
    }
  for (; i < len; ++i) {
    const float cc = to_float(c[i]), gg = guided(p, to_float(u[i]), cc);
    acc[0][0] += cc, acc[1][0] += double(cc) * cc, acc[2][0] += gg, acc[3][0] += double(gg) * gg;
  }
  for (int q = 0; q < 4; ++q) {
    double t = 0;
    for (int k = 0; k < kLanes; ++k) t += acc[q][k];
    out[q] = t;
  }
}

// {k_b, s_b} of batch item b with `threads` threads; partial and absx0 are scratch.
template <class T>
void reduce_item(const DiffusionStepParams& p, int64_t b, int threads, std::vector<double>& partial,
                 std::vector<float>& absx0) {
  const int64_t per = p.sample_size(), base = b * per;
  const int64_t blocks = (per + kBlock - 1) / kBlock;
  const bool cfg = p.model_cond != nullptr, parallel = threads > 1 && per > kParallelThreshold;
  float k_scale = 1.f;
  if (p.rescales()) {
#pragma omp parallel for num_threads(threads) schedule(static) if (parallel)
    for (int64_t blk = 0; blk < blocks; ++blk) {
      const int64_t j0 = base + blk * kBlock;
      rescale_sums<T>(p, j0, std::min<int64_t>(kBlock, base + per - j0), &partial[size_t(blk) * 4]);
    }
    double t[4] = {0, 0, 0, 0};
    for (int64_t blk = 0; blk < blocks; ++blk)
      for (int k = 0; k < 4; ++k) t[k] += partial[size_t(blk) * 4 + k];
    k_scale = rescale_factor(p.guidance_rescale, t[0], t[1], t[2], t[3], per);
    p.per_sample[2 * b] = k_scale;
  }
  if (!p.thresholds()) return;
  const bool has_z = p.has_noise && p.pz != 0.f, z_from_tensor = has_z && p.noise != nullptr;
#pragma omp parallel for num_threads(threads) schedule(static) if (parallel)
  for (int64_t blk = 0; blk < blocks; ++blk) {
    // Philox groups follow the global element index: draw from the group boundary
    const int64_t j0 = base + blk * kBlock, len = std::min<int64_t>(kBlock, base + per - j0);
    alignas(64) float zbuf[kBlock + 4];
    const int64_t lead = j0 & 3;
    if (has_z && !z_from_tensor) draw_gaussians(p.seed, p.offset, j0 - lead, std::min<int64_t>(kBlock, len + lead), zbuf);
    if (has_z && !z_from_tensor && len + lead > kBlock)
      draw_gaussians(p.seed, p.offset, j0 - lead + kBlock, len + lead - kBlock, zbuf + kBlock);
    for (int64_t i = 0; i < len; ++i) {
      const int64_t e = j0 + i;
      const float uu = to_float(static_cast<const T*>(p.model_uncond)[e]);
      float m = cfg ? guided(p, uu, to_float(static_cast<const T*>(p.model_cond)[e])) : uu;
      if (p.rescales()) m *= k_scale;
      const float z = !has_z ? 0.f : z_from_tensor ? to_float(static_cast<const T*>(p.noise)[e]) : zbuf[i + lead];
      const float x0 = step_x0(p, to_float(static_cast<const T*>(p.sample)[e]), m, z);
      absx0[size_t(e - base)] = x0 < 0.f ? -x0 : x0;
    }
  }
  // torch.quantile gives NaN for a sample holding NaN; nth_element needs an ordering
  if (std::any_of(absx0.begin(), absx0.end(), [](float v) { return v != v; })) {
    p.per_sample[2 * b + 1] = __builtin_nanf("");
    return;
  }
  const QuantileRank r = quantile_rank(p.threshold_ratio, per);
  std::nth_element(absx0.begin(), absx0.begin() + r.lo, absx0.end());
  const float v_lo = absx0[size_t(r.lo)];
  const float v_hi = r.hi == r.lo ? v_lo : *std::min_element(absx0.begin() + r.lo + 1, absx0.end());
  p.per_sample[2 * b + 1] = threshold_from_order_stats(v_lo, v_hi, r.weight, p.threshold_max);
}

// The per-sample scalars {k_b, s_b} of the reduction pass (see the header comment): one item
// per thread when there are enough items (the selection is serial), else the threads share
// each item's passes.
template <class T>
void reduce_per_sample(const DiffusionStepParams& p, int num_threads) {
  const int64_t per = p.sample_size(), blocks = (per + kBlock - 1) / kBlock;
  const size_t scratch = p.thresholds() ? size_t(per) : 0;
  if (num_threads > 1 && p.batch >= num_threads && per > kParallelThreshold / 8) {
#pragma omp parallel num_threads(num_threads)
    {
      std::vector<double> partial(size_t(blocks) * 4);
      std::vector<float> absx0(scratch);
#pragma omp for schedule(static)
      for (int64_t b = 0; b < p.batch; ++b) reduce_item<T>(p, b, 1, partial, absx0);
    }
    return;
  }
  std::vector<double> partial(size_t(blocks) * 4);
  std::vector<float> absx0(scratch);
  for (int64_t b = 0; b < p.batch; ++b) reduce_item<T>(p, b, num_threads, partial, absx0);
}
}  // namespace

template <class T>
void diffusion_step(const DiffusionStepParams& p, int num_threads) {
  if (p.needs_reduction()) reduce_per_sample<T>(p, num_threads);
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
