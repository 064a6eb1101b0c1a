// Per-step scalars of the fused denoising step, in float64 on the host: the one implementation
// of each sampler's step formula (after diffusers' schedulers) used by the CPU kernels, the
// CUDA kernels and the emulator (see core/diffusion_step.h for the update they parameterise).
//
// Each formula is written as in the sampler's paper / diffusers' step(), as linear forms over
// the per-element quantities (x, m, z, x0, h); x0 is then substituted into the update unless
// it is clipped, so cancellations between coefficients happen in float64, once per step,
// instead of in fp32 per element.
#pragma once
#include <cmath>
#include <stdexcept>
#include <string>
#include "core/diffusion_step.h"

namespace gk {

enum class Sampler : int { kDDIM = 0, kDDPM = 1, kEuler = 2, kEulerAncestral = 3, kDPMSolverPP2M = 4, kFlowEuler = 5 };
enum class Prediction : int { kEpsilon = 0, kVPrediction = 1, kSample = 2, kFlow = 3 };

/// The inputs of one step; each sampler reads the fields its comment names.
struct StepScalars {
  // DDIM, DDPM: cumulative alphas at t and at the previous timestep (1 past the end).
  double alpha_prod_t = 0, alpha_prod_prev = 0;
  double eta = 0;                        // DDIM
  bool use_clipped_model_output = false; // DDIM
  bool variance_large = false;           // DDPM: fixed_large instead of fixed_small
  bool add_noise = false;                // DDPM: t > 0
  double clip = 0;                       // DDIM, DDPM: clip_sample_range when > 0
  // Euler, Euler ancestral, DPM-Solver++, flow Euler: sigmas at the previous, current and next step.
  double sigma_prev = 0, sigma = 0, sigma_next = 0;
  double gamma = 0, s_noise = 1;          // Euler churn
  int order = 1;                          // DPM-Solver++: 1 or 2
  bool sde = false;                       // DPM-Solver++: sde-dpmsolver++; flow Euler: stochastic sampling
  bool flow_sigmas = false;               // DPM-Solver++: alpha = 1 - sigma
  bool keep_x0 = false;                   // dynamic thresholding: x0 stays a separate quantity (c0)
};

namespace coeffs_detail {
// A linear form over the per-element quantities.
struct Lin {
  double x = 0, m = 0, z = 0, x0 = 0, h = 0;
};
inline Lin operator+(Lin a, Lin b) { return {a.x + b.x, a.m + b.m, a.z + b.z, a.x0 + b.x0, a.h + b.h}; }
inline Lin operator-(Lin a, Lin b) { return {a.x - b.x, a.m - b.m, a.z - b.z, a.x0 - b.x0, a.h - b.h}; }
inline Lin operator*(double k, Lin a) { return {k * a.x, k * a.m, k * a.z, k * a.x0, k * a.h}; }
inline const Lin kX{1, 0, 0, 0, 0}, kM{0, 1, 0, 0, 0}, kZ{0, 0, 1, 0, 0}, kX0{0, 0, 0, 1, 0}, kH{0, 0, 0, 0, 1};

inline void require(bool ok, const std::string& what) {
  if (!ok) throw std::invalid_argument("genkernels: " + what);
}

// x0 from the model output in the parameterisation x = alpha x0 + sigma eps (flow: alpha = 1 - sigma).
inline Lin x0_alpha_sigma(Prediction p, double alpha, double sigma, const char* sampler) {
  switch (p) {
    case Prediction::kEpsilon: return (1.0 / alpha) * (kX - sigma * kM);
    case Prediction::kVPrediction: return alpha * kX - sigma * kM;
    case Prediction::kSample: return kM;
    case Prediction::kFlow: break;
  }
  require(false, std::string(sampler) + ": prediction_type 'flow_prediction' is not supported by this sampler");
  return {};
}

// Fills `out` from the forms of x0 and of the update; x0 stays a separate quantity only when
// it is clipped or thresholded (keep).
inline StepCoeffs finish(const Lin& x0, const Lin& prev, double clip, bool keep = false) {
  StepCoeffs k;
  k.px = x0.x, k.pm = x0.m, k.pz = x0.z;
  k.clip = clip;
  Lin u = prev;
  if (clip <= 0 && !keep) u = Lin{u.x, u.m, u.z, 0, u.h} + u.x0 * x0;
  k.cx = u.x, k.cm = u.m, k.cz = u.z, k.c0 = u.x0, k.ch = u.h;
  return k;
}

inline StepCoeffs ddim(Prediction p, const StepScalars& s) {
  require(s.alpha_prod_t > 0 && s.alpha_prod_t < 1, "ddim: alpha_prod_t must be in (0, 1)");
  require(s.alpha_prod_prev > 0 && s.alpha_prod_prev <= 1, "ddim: alpha_prod_prev must be in (0, 1]");
  require(s.eta >= 0, "ddim: eta must be >= 0");
  const double a = std::sqrt(s.alpha_prod_t), sg = std::sqrt(1 - s.alpha_prod_t);
  const Lin x0 = x0_alpha_sigma(p, a, sg, "ddim");
  Lin eps = p == Prediction::kEpsilon ? kM : p == Prediction::kSample ? (1.0 / sg) * (kX - a * kM) : a * kM + sg * kX;
  if (s.use_clipped_model_output) eps = (1.0 / sg) * (kX - a * kX0);
  const double variance = (1 - s.alpha_prod_prev) / (1 - s.alpha_prod_t) * (1 - s.alpha_prod_t / s.alpha_prod_prev);
  const double std_dev = s.eta * std::sqrt(variance);
  const double direction = std::sqrt(1 - s.alpha_prod_prev - std_dev * std_dev);
  Lin prev = std::sqrt(s.alpha_prod_prev) * kX0 + direction * eps;
  if (s.eta > 0) prev = prev + std_dev * kZ;
  return finish(x0, prev, s.clip, s.keep_x0);
}

inline StepCoeffs ddpm(Prediction p, const StepScalars& s) {
  require(s.alpha_prod_t > 0 && s.alpha_prod_t < 1, "ddpm: alpha_prod_t must be in (0, 1)");
  require(s.alpha_prod_prev > 0 && s.alpha_prod_prev <= 1, "ddpm: alpha_prod_prev must be in (0, 1]");
  const double beta_prod_t = 1 - s.alpha_prod_t, beta_prod_prev = 1 - s.alpha_prod_prev;
  const double current_alpha = s.alpha_prod_t / s.alpha_prod_prev, current_beta = 1 - current_alpha;
  const Lin x0 = x0_alpha_sigma(p, std::sqrt(s.alpha_prod_t), std::sqrt(beta_prod_t), "ddpm");
  Lin prev = (std::sqrt(s.alpha_prod_prev) * current_beta / beta_prod_t) * kX0 +
             (std::sqrt(current_alpha) * beta_prod_prev / beta_prod_t) * kX;
  if (s.add_noise) {
    const double small = std::fmax(beta_prod_prev / beta_prod_t * current_beta, 1e-20);
    prev = prev + std::sqrt(s.variance_large ? current_beta : small) * kZ;
  }
  return finish(x0, prev, s.clip, s.keep_x0);
}

// Karras-style sigma parameterisation (x = x0 + sigma eps, scaled model input).
inline Lin x0_karras(Prediction p, const Lin& x, double sigma_for_eps, double sigma, const char* sampler) {
  switch (p) {
    case Prediction::kEpsilon: return x - sigma_for_eps * kM;
    case Prediction::kVPrediction: return (-sigma / std::sqrt(sigma * sigma + 1)) * kM + (1.0 / (sigma * sigma + 1)) * x;
    case Prediction::kSample: return kM;
    case Prediction::kFlow: break;
  }
  require(false, std::string(sampler) + ": prediction_type 'flow_prediction' is not supported by this sampler");
  return {};
}

inline StepCoeffs euler(Prediction p, const StepScalars& s) {
  require(s.sigma > 0, "euler: sigma must be > 0");
  require(s.gamma >= 0, "euler: gamma must be >= 0");
  const double sigma_hat = s.sigma * (s.gamma + 1);
  const double churn = s.gamma > 0 ? s.s_noise * std::sqrt(sigma_hat * sigma_hat - s.sigma * s.sigma) : 0.0;
  const Lin x = kX + churn * kZ;  // the sample after churn noise
  const Lin x0 = x0_karras(p, x, sigma_hat, s.sigma, "euler");
  const Lin derivative = (1.0 / sigma_hat) * (x - x0);
  return finish(x0, x + (s.sigma_next - sigma_hat) * derivative, 0);
}

inline StepCoeffs euler_ancestral(Prediction p, const StepScalars& s) {
  require(s.sigma > 0, "euler_ancestral: sigma must be > 0");
  require(s.sigma_next >= 0 && s.sigma_next <= s.sigma, "euler_ancestral: sigma_next must be in [0, sigma]");
  const double sf2 = s.sigma * s.sigma, st2 = s.sigma_next * s.sigma_next;
  const double sigma_up = std::sqrt(st2 * (sf2 - st2) / sf2);
  const double sigma_down = std::sqrt(st2 - sigma_up * sigma_up);
  const Lin x0 = x0_karras(p, kX, s.sigma, s.sigma, "euler_ancestral");
  const Lin derivative = (1.0 / s.sigma) * (kX - x0);
  return finish(x0, kX + (sigma_down - s.sigma) * derivative + sigma_up * kZ, 0);
}

inline StepCoeffs dpmpp_2m(Prediction p, const StepScalars& s) {
  require(s.order == 1 || s.order == 2, "dpmpp_2m: order must be 1 or 2");
  require(s.sigma > 0, "dpmpp_2m: sigma must be > 0");
  require(s.sigma_next >= 0, "dpmpp_2m: sigma_next must be >= 0");
  require(s.order == 1 || s.sigma_prev > 0, "dpmpp_2m: sigma_prev must be > 0 for a second-order step");
  auto alpha_of = [&](double sg) { return s.flow_sigmas ? 1 - sg : 1 / std::sqrt(sg * sg + 1); };
  auto sigma_of = [&](double sg) { return s.flow_sigmas ? sg : sg / std::sqrt(sg * sg + 1); };
  auto lambda_of = [&](double sg) { return std::log(alpha_of(sg)) - std::log(sigma_of(sg)); };
  const double alpha_t = alpha_of(s.sigma_next), sigma_t = sigma_of(s.sigma_next);
  const double alpha_s0 = alpha_of(s.sigma), sigma_s0 = sigma_of(s.sigma);
  const Lin x0 = p == Prediction::kFlow ? kX - s.sigma * kM : x0_alpha_sigma(p, alpha_s0, sigma_s0, "dpmpp_2m");
  const double h = lambda_of(s.sigma_next) - lambda_of(s.sigma);
  // D1 = (x0 - x0_prev) / r0, r0 = h_0 / h
  const Lin d1 = s.order == 2 ? (h / (lambda_of(s.sigma) - lambda_of(s.sigma_prev))) * (kX0 - kH) : Lin{};
  Lin prev;
  if (!s.sde) {
    const double e = alpha_t * (std::exp(-h) - 1.0);
    prev = (sigma_t / sigma_s0) * kX - e * kX0 - 0.5 * e * d1;
  } else {
    const double e = alpha_t * (1 - std::exp(-2.0 * h));
    prev = (sigma_t / sigma_s0 * std::exp(-h)) * kX + e * kX0 + 0.5 * e * d1 +
           (sigma_t * std::sqrt(1.0 - std::exp(-2.0 * h))) * kZ;
  }
  return finish(x0, prev, 0, s.keep_x0);
}

inline StepCoeffs flow_euler(Prediction p, const StepScalars& s) {
  require(p == Prediction::kFlow, "flow_euler: prediction_type must be 'flow_prediction'");
  const Lin x0 = kX - s.sigma * kM;
  if (s.sde) return finish(x0, (1.0 - s.sigma_next) * kX0 + s.sigma_next * kZ, 0);
  return finish(x0, kX + (s.sigma_next - s.sigma) * kM, 0);
}
}  // namespace coeffs_detail

/// The scalars of one step of `sampler` for `prediction`. Throws std::invalid_argument for an
/// unknown code, an unsupported combination or an out-of-range value.
inline StepCoeffs step_coeffs(int sampler, int prediction, const StepScalars& s) {
  coeffs_detail::require(prediction >= 0 && prediction <= 3, "unknown prediction type code " + std::to_string(prediction));
  coeffs_detail::require(!s.keep_x0 || sampler == int(Sampler::kDDIM) || sampler == int(Sampler::kDDPM) ||
                             sampler == int(Sampler::kDPMSolverPP2M),
                         "dynamic thresholding is supported by the ddim, ddpm and dpmpp_2m steps only (as in diffusers)");
  const auto p = static_cast<Prediction>(prediction);
  switch (static_cast<Sampler>(sampler)) {
    case Sampler::kDDIM: return coeffs_detail::ddim(p, s);
    case Sampler::kDDPM: return coeffs_detail::ddpm(p, s);
    case Sampler::kEuler: return coeffs_detail::euler(p, s);
    case Sampler::kEulerAncestral: return coeffs_detail::euler_ancestral(p, s);
    case Sampler::kDPMSolverPP2M: return coeffs_detail::dpmpp_2m(p, s);
    case Sampler::kFlowEuler: return coeffs_detail::flow_euler(p, s);
  }
  throw std::invalid_argument("genkernels: unknown sampler code " + std::to_string(sampler));
}

}  // namespace gk
