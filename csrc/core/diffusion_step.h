// The fused denoising step shared by every sampler: parameters and the per-element update.
//
// Every supported sampler step (DDPM, DDIM, Euler, Euler ancestral, DPM-Solver++ 2M and its SDE
// variant, flow-matching Euler) is, per element, linear in the sample x, the guided model
// output m, the history h (DPM-Solver++: the previous step's x0) and the noise z, except for
// the clipping of the predicted original sample x0. So one kernel serves them all:
//
//   m    = cfg ? u + w (c - u) : model_output           (classifier-free guidance, fused)
//   z    = noise tensor, or Philox(seed, offset, i)      (only when a noise coefficient is set)
//   x0   = px x + pm m + pz z,  clamped to [-clip, clip] when clip > 0
//   prev = cx x + cm m + c0 x0 + ch h + cz z
//
// The scalars come from csrc/core/diffusion_coeffs.h, computed once per step on the host in
// float64 and rounded to float once. Math is fp32; loads and stores convert fp16/bf16 once.
#pragma once
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

  void set_coeffs(const StepCoeffs& k) {
    px = float(k.px), pm = float(k.pm), pz = float(k.pz);
    cx = float(k.cx), cm = float(k.cm), c0 = float(k.c0), ch = float(k.ch), cz = float(k.cz);
    clip = float(k.clip);
    has_noise = k.pz != 0 || k.cz != 0;
  }
  // x0 must be formed when it is clipped, written out or used by the update
  GK_HOST_DEVICE bool needs_x0() const { return clip > 0.f || pred_original != nullptr || c0 != 0.f; }
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

GK_HOST_DEVICE GK_INLINE float step_prev(const DiffusionStepParams& p, float x, float m, float x0, float h, float z) {
  return p.cx * x + p.cm * m + p.c0 * x0 + p.ch * h + p.cz * z;
}

}  // namespace gk
