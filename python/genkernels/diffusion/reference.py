"""Float64 references of the fused denoising steps, written from diffusers' ``step()`` formulas
(not from csrc/core/diffusion_coeffs.h), shared by the tests and the benchmarks and re-exported
by ``genkernels.reference``.

Each ``*_step`` takes the arguments of its ``genkernels.diffusion`` counterpart (``noise``, when
the step needs any, must be given as a tensor) and returns ``(prev_sample, pred_original_sample)``
computed in ``dtype`` (float64 by default; a low dtype gives "PyTorch's own computation in the
dtype", the baseline of the tolerance rule); ``pred_original_sample`` is None for flow Euler.
"""
from __future__ import annotations

import math

import torch


def guided(model_output, guidance_scale=None, guidance_rescale=0.0, dtype=torch.float64):
    """The pipeline's CFG (``uncond + w (cond - uncond)`` from ``[uncond; cond]``) and diffusers'
    ``rescale_noise_cfg``, in float64."""
    m = model_output.to(dtype)
    if guidance_scale is None:
        return m
    u, c = m.chunk(2)
    g = u + guidance_scale * (c - u)
    if guidance_rescale:
        dims = list(range(1, g.dim()))
        rescaled = g * (c.std(dim=dims, keepdim=True) / g.std(dim=dims, keepdim=True))
        g = guidance_rescale * rescaled + (1 - guidance_rescale) * g
    return g


def threshold_sample(x0, ratio, max_value):
    """diffusers' ``_threshold_sample``: per batch item s = clamp(quantile(|x0|), 1, max), in the
    dtype of x0 (fp16/bf16 upcast to fp32 for the quantile, as diffusers does)."""
    dtype = x0.dtype
    flat = x0.reshape(x0.shape[0], -1)
    flat = flat if dtype in (torch.float32, torch.float64) else flat.float()
    s = torch.quantile(flat.abs(), ratio, dim=1).clamp(min=1, max=max_value).unsqueeze(1)
    return (torch.clamp(flat, -s, s) / s).reshape(x0.shape).to(dtype)


def _x0_eps(prediction_type, x, m, alpha, sigma):
    """(x0, eps) of x = alpha x0 + sigma eps for a model predicting `prediction_type`."""
    if prediction_type == "epsilon":
        return (x - sigma * m) / alpha, m
    if prediction_type == "v_prediction":
        return alpha * x - sigma * m, alpha * m + sigma * x
    if prediction_type in ("sample", "original_sample"):
        return m, (x - alpha * m) / sigma
    raise ValueError(f"prediction_type {prediction_type!r} is not supported by this sampler")


def _post_x0(x0, clip_sample_range, dynamic_thresholding_ratio, sample_max_value):
    if dynamic_thresholding_ratio is not None:
        return threshold_sample(x0, dynamic_thresholding_ratio, sample_max_value)
    if clip_sample_range is not None:
        return x0.clamp(-clip_sample_range, clip_sample_range)
    return x0


def ddim_step(model_output, sample, alpha_prod_t, alpha_prod_prev, *, prediction_type="epsilon", eta=0.0,
              use_clipped_model_output=False, clip_sample_range=None, dynamic_thresholding_ratio=None,
              sample_max_value=1.0, guidance_scale=None, guidance_rescale=0.0, noise=None, dtype=torch.float64, **_):
    m, x = guided(model_output, guidance_scale, guidance_rescale, dtype), sample.to(dtype)
    a, b = alpha_prod_t, 1 - alpha_prod_t
    x0, eps = _x0_eps(prediction_type, x, m, a**0.5, b**0.5)
    x0 = _post_x0(x0, clip_sample_range, dynamic_thresholding_ratio, sample_max_value)
    std = eta * ((1 - alpha_prod_prev) / b * (1 - a / alpha_prod_prev)) ** 0.5
    if use_clipped_model_output:
        eps = (x - a**0.5 * x0) / b**0.5
    prev = alpha_prod_prev**0.5 * x0 + (1 - alpha_prod_prev - std**2) ** 0.5 * eps
    if eta > 0:
        prev = prev + std * noise.to(dtype)
    return prev, x0


def ddpm_step(model_output, sample, alpha_prod_t, alpha_prod_prev, *, prediction_type="epsilon",
              variance_type="fixed_small", add_noise=True, clip_sample_range=None, dynamic_thresholding_ratio=None,
              sample_max_value=1.0, guidance_scale=None, guidance_rescale=0.0, noise=None, dtype=torch.float64, **_):
    m, x = guided(model_output, guidance_scale, guidance_rescale, dtype), sample.to(dtype)
    beta_t, beta_prev = 1 - alpha_prod_t, 1 - alpha_prod_prev
    cur_alpha = alpha_prod_t / alpha_prod_prev
    cur_beta = 1 - cur_alpha
    x0, _eps = _x0_eps(prediction_type, x, m, alpha_prod_t**0.5, beta_t**0.5)
    x0 = _post_x0(x0, clip_sample_range, dynamic_thresholding_ratio, sample_max_value)
    prev = (alpha_prod_prev**0.5 * cur_beta / beta_t) * x0 + (cur_alpha**0.5 * beta_prev / beta_t) * x
    if add_noise:
        var = cur_beta if variance_type == "fixed_large" else max(beta_prev / beta_t * cur_beta, 1e-20)
        prev = prev + var**0.5 * noise.to(dtype)
    return prev, x0


def _x0_karras(prediction_type, x, m, sigma_eps, sigma):
    if prediction_type == "epsilon":
        return x - sigma_eps * m
    if prediction_type == "v_prediction":
        return m * (-sigma / (sigma**2 + 1) ** 0.5) + x / (sigma**2 + 1)
    if prediction_type in ("sample", "original_sample"):
        return m
    raise ValueError(f"prediction_type {prediction_type!r} is not supported by this sampler")


def euler_step(model_output, sample, sigma, sigma_next, *, prediction_type="epsilon", gamma=0.0, s_noise=1.0,
               guidance_scale=None, guidance_rescale=0.0, noise=None, dtype=torch.float64, **_):
    m, x = guided(model_output, guidance_scale, guidance_rescale, dtype), sample.to(dtype)
    sigma_hat = sigma * (gamma + 1)
    if gamma > 0:
        x = x + noise.to(dtype) * s_noise * (sigma_hat**2 - sigma**2) ** 0.5
    x0 = _x0_karras(prediction_type, x, m, sigma_hat, sigma)
    return x + (x - x0) / sigma_hat * (sigma_next - sigma_hat), x0


def euler_ancestral_step(model_output, sample, sigma, sigma_next, *, prediction_type="epsilon", guidance_scale=None,
                         guidance_rescale=0.0, noise=None, dtype=torch.float64, **_):
    m, x = guided(model_output, guidance_scale, guidance_rescale, dtype), sample.to(dtype)
    x0 = _x0_karras(prediction_type, x, m, sigma, sigma)
    sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
    sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
    return x + (x - x0) / sigma * (sigma_down - sigma) + noise.to(dtype) * sigma_up, x0


def dpmpp_2m_step(model_output, sample, sigma, sigma_next, *, sigma_prev=None, prev_pred_original=None,
                  prediction_type="epsilon", sde=False, flow_sigmas=False, dynamic_thresholding_ratio=None,
                  sample_max_value=1.0, guidance_scale=None, guidance_rescale=0.0, noise=None, dtype=torch.float64, **_):
    m, x = guided(model_output, guidance_scale, guidance_rescale, dtype), sample.to(dtype)

    def alpha_sigma(sg):
        return (1 - sg, sg) if flow_sigmas else (1 / (sg**2 + 1) ** 0.5, sg / (sg**2 + 1) ** 0.5)

    def lam(sg):
        a, s = alpha_sigma(sg)
        return math.log(a) - math.log(s)

    alpha_t, sigma_t = alpha_sigma(sigma_next)
    alpha_s, sigma_s = alpha_sigma(sigma)
    if prediction_type == "flow_prediction":
        x0 = x - sigma * m
    else:
        x0, _eps = _x0_eps(prediction_type, x, m, alpha_s, sigma_s)
    x0 = _post_x0(x0, None, dynamic_thresholding_ratio, sample_max_value)
    h = lam(sigma_next) - lam(sigma)
    d = x0
    if prev_pred_original is not None:
        r0 = (lam(sigma) - lam(sigma_prev)) / h
        d = x0 + 0.5 * (x0 - prev_pred_original.to(dtype)) / r0
    if not sde:
        prev = (sigma_t / sigma_s) * x - alpha_t * (math.exp(-h) - 1.0) * d
    else:
        prev = (sigma_t / sigma_s * math.exp(-h)) * x + alpha_t * (1 - math.exp(-2.0 * h)) * d
        prev = prev + sigma_t * (1.0 - math.exp(-2.0 * h)) ** 0.5 * noise.to(dtype)
    return prev, x0


def flow_euler_step(model_output, sample, sigma, sigma_next, *, stochastic=False, guidance_scale=None,
                    guidance_rescale=0.0, noise=None, dtype=torch.float64, **_):
    m, x = guided(model_output, guidance_scale, guidance_rescale, dtype), sample.to(dtype)
    if stochastic:
        x0 = x - sigma * m
        return (1.0 - sigma_next) * x0 + sigma_next * noise.to(dtype), None
    return x + (sigma_next - sigma) * m, None
