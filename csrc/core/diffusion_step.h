// The fused denoising step shared by every sampler: parameters and the per-element update.
//
// Every supported sampler step (DDPM, DDIM, Euler, Euler ancestral, DPM-Solver++ 2M and its SDE
// variant, flow-matching Euler) is, per element, linear in the sample x, the guided model
// output m, the history h (DPM-Solver++: the previous step's x0) and the noise z, except for
// the clipping of the predicted original sample x0. So one kernel serves them all:
//
//   m    = cfg ? u + w (c - u) : model_output           (classifier-free guidance, fused)
//   m    = k_b m                                         (guidance_rescale, per sample b)
//   z    = noise tensor, or Philox(seed, offset, i)      (only when a noise coefficient is set)
//   x0   = px x + pm m + pz z,  clamped to [-clip, clip] when clip > 0,
//          or clamp(x0, -s_b, s_b) / s_b                  (dynamic thresholding, per sample b)
//   prev = cx x + cm m + c0 x0 + ch h + cz z
//
// The scalars come from csrc/core/diffusion_coeffs.h, computed once per step on the host in
// float64 and rounded to float once. Math is fp32; loads and stores convert fp16/bf16 once.
//
// Per-sample reductions (a pass before the elementwise update, over the n / batch elements of
// each batch item b, written to `per_sample` as {k_b, s_b}):
//   guidance_rescale phi (diffusers' rescale_noise_cfg): k_b = 1 - phi + phi std(c) / std(g),
//     g = u + w (c - u), std with Bessel's correction, sums in float64;
//   dynamic thresholding (diffusers' _threshold_sample): s_b = clamp(quantile(|x0|, ratio), 1,
//     threshold_max), the quantile with torch.quantile's linear interpolation between the
//     order statistics floor(r) and ceil(r), r = fp32(ratio) * fp32(count - 1) rounded to fp32
//     as torch does; the order statistics are exact (selection, see the kernels), the
//     interpolation is done in float64 and rounded once.
#pragma once
#include <cmath>
#include <cstdint>
#include "core/common.h"

namespace gk {

/// The per-step scalars of the fused update (see the header comment).
struct StepCoeffs {
  double px = 0, pm = 0, pz = 0;                // x0 = px x + pm m + pz z
  double cx = 0, cm = 0, c0 = 0, ch = 0, cz = 0;  // prev = cx x + cm m + c0 x0 + ch h + cz z
  double clip = 0;                              // clamp x0 to [-clip, clip] when > 0
};

/// Pointers and scalars of one fused step over `n` contiguous elements.
struct DiffusionStepParams {
  int64_t n = 0;                      // elements of the sample
  const void* model_uncond = nullptr; // model output, or its unconditional half under guidance
  const void* model_cond = nullptr;   // conditional half (null: no guidance)
  const void* sample = nullptr;
  const void* history = nullptr;      // previous x0 (null when ch == 0)
  const void* noise = nullptr;        // noise tensor (null: Philox when has_noise)
  void* prev_sample = nullptr;        // may alias sample
  void* pred_original = nullptr;      // optional x0 output
  float guidance = 1.f;
  float px = 0, pm = 0, pz = 0, cx = 0, cm = 0, c0 = 0, ch = 0, cz = 0, clip = 0;
  bool has_noise = false;             // pz or cz nonzero
  uint64_t seed = 0, offset = 0;      // Philox key and counter offset (the step)
  // per-sample reductions (see the header comment); batch divides n
  int64_t batch = 1;
  float guidance_rescale = 0.f;       // phi; needs model_cond
  float threshold_ratio = 0.f;        // dynamic thresholding quantile when > 0 (clip is then 0)
  float threshold_max = 1.f;          // diffusers' sample_max_value
  float* per_sample = nullptr;        // 2 * batch floats {k_b, s_b}: written by the reduction pass

  GK_HOST_DEVICE bool rescales() const { return guidance_rescale != 0.f; }
  GK_HOST_DEVICE bool thresholds() const { return threshold_ratio > 0.f; }
  GK_HOST_DEVICE bool needs_reduction() const { return rescales() || thresholds(); }
  GK_HOST_DEVICE int64_t sample_size() const { return batch > 0 ? n / batch : 0; }

  void set_coeffs(const StepCoeffs& k) {
    px = float(k.px), pm = float(k.pm), pz = float(k.pz);
    cx = float(k.cx), cm = float(k.cm), c0 = float(k.c0), ch = float(k.ch), cz = float(k.cz);
    clip = float(k.clip);
    has_noise = k.pz != 0 || k.cz != 0;
  }
  // x0 must be formed when it is clipped, written out or used by the update
  GK_HOST_DEVICE bool needs_x0() const {
    return clip > 0.f || threshold_ratio > 0.f || pred_original != nullptr || c0 != 0.f;
  }
};

/// The per-element update, for the scalar paths (the SIMD and vectorised paths spell out the
/// same operations in the same order).
GK_HOST_DEVICE GK_INLINE float guided(const DiffusionStepParams& p, float u, float c) {
  return u + p.guidance * (c - u);
}

GK_HOST_DEVICE GK_INLINE float step_x0(const DiffusionStepParams& p, float x, float m, float z) {
  float x0 = p.px * x + p.pm * m + p.pz * z;
  if (p.clip > 0.f) x0 = x0 < -p.clip ? -p.clip : (x0 > p.clip ? p.clip : x0);
  return x0;
}

/// Dynamic thresholding of x0 by the sample's s >= 1, as diffusers: clamp, then divide.
GK_HOST_DEVICE GK_INLINE float threshold_x0(float x0, float s) {
  x0 = x0 < -s ? -s : (x0 > s ? s : x0);
  return x0 / s;
}

/// The selection target of dynamic thresholding over `count` values: torch.quantile's rank
/// r = q (count - 1) in fp32 (torch evaluates it in the input dtype), its floor and ceil.
struct QuantileRank {
  int64_t lo, hi;
  double weight;
};
GK_HOST_DEVICE GK_INLINE QuantileRank quantile_rank(float q, int64_t count) {
  const float r = q * float(count - 1);
  QuantileRank k;
  k.lo = int64_t(r);
  k.hi = k.lo + (float(k.lo) < r ? 1 : 0);
  if (k.hi > count - 1) k.hi = count - 1;
  k.weight = double(r) - double(k.lo);
  return k;
}

/// s_b from the order statistics: lerp as torch (below/above one half), clamped to [1, max].
GK_HOST_DEVICE GK_INLINE float threshold_from_order_stats(float v_lo, float v_hi, double w, float max_value) {
  const double q = w < 0.5 ? double(v_lo) + w * (double(v_hi) - double(v_lo))
                           : double(v_hi) - (double(v_hi) - double(v_lo)) * (1.0 - w);
  float s = float(q);
  s = s < 1.f ? 1.f : s;  // NaN passes through both comparisons
  return s > max_value ? max_value : s;
}

/// k_b of guidance_rescale from the float64 sums of c, c^2, g, g^2 over `count` elements.
GK_HOST_DEVICE GK_INLINE float rescale_factor(double phi, double sc, double scc, double sg, double sgg, int64_t count) {
  const double denom = double(count > 1 ? count - 1 : 1);
  double var_c = (scc - sc * sc / double(count)) / denom, var_g = (sgg - sg * sg / double(count)) / denom;
  var_c = var_c < 0 ? 0 : var_c;
  var_g = var_g < 0 ? 0 : var_g;
  return float(1.0 - phi + phi * sqrt(var_c) / sqrt(var_g));
}

GK_HOST_DEVICE GK_INLINE float step_prev(const DiffusionStepParams& p, float x, float m, float x0, float h, float z) {
  return p.cx * x + p.cm * m + p.c0 * x0 + p.ch * h + p.cz * z;
}

}  // namespace gk
