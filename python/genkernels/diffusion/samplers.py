"""Functional fused denoising steps: one kernel pass per step, with classifier-free guidance,
x0 clipping and in-kernel noise.

Each ``*_step`` takes the model output and the current sample plus the step's schedule scalars
(the numbers diffusers' scheduler reads from its tables at that step), and returns the new
sample, or ``(prev_sample, pred_original_sample)`` with ``return_pred_original=True``.

Common keyword arguments:
    guidance_scale: when given, ``model_output`` holds ``2 * batch`` rows, the unconditional
        batch then the conditional one (``torch.cat([uncond, cond])``, as diffusers batches
        them), and the step uses ``uncond + guidance_scale * (cond - uncond)``.
    noise: a tensor of standard normal noise shaped like ``sample``, for exact parity with an
        external generator. Otherwise noise (when the step needs any) is Philox4x32-10 keyed by
        ``(seed, offset)`` with the element index as counter: the same on every device.
        ``seed=None`` draws a seed from torch's default generator.
    guidance_rescale: ``phi`` of diffusers' ``rescale_noise_cfg`` (needs ``guidance_scale``): the
        guided prediction is scaled per batch item by ``1 - phi + phi * std(cond) / std(guided)``
        (std over all non-batch dims, Bessel-corrected, float64 sums).
    out: write the new sample here (may be ``sample`` itself, for an in-place update).

DDIM, DDPM and DPM-Solver++ 2M also take ``dynamic_thresholding_ratio`` (None: off) and
``sample_max_value``: diffusers' ``_threshold_sample`` on the predicted x0, per batch item
``s = clamp(quantile(|x0|, ratio), 1, sample_max_value)``, ``x0 = clamp(x0, -s, s) / s`` (the
quantile interpolates linearly as ``torch.quantile``; exclusive with ``clip_sample_range``).
Guidance rescale and thresholding run a per-sample reduction pass before the fused update.

Every tensor must be contiguous: a strided input raises ``ValueError`` naming it (no hidden
copies).

Math is float32 whatever the latent dtype (bf16/fp16 latents are rounded once on store);
the per-step scalars are computed in float64 by csrc/core/diffusion_coeffs.h.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .._checks import check_flag, check_int, check_number
from . import _fused


def _run(
    coeffs: Sequence[float],
    model_output: torch.Tensor,
    sample: torch.Tensor,
    *,
    guidance_scale: float | None,
    history: torch.Tensor | None = None,
    noise: torch.Tensor | None,
    seed: int | None,
    offset: int,
    out: torch.Tensor | None,
    return_pred_original: bool,
    guidance_rescale: float = 0.0,
    threshold: tuple[float, float] = (0.0, 1.0),
):
    if noise is None and _fused.needs_noise(coeffs) and seed is None:
        seed = _fused.draw_seed()
    seed = 0 if seed is None else check_int("seed", seed)
    offset = check_int("offset", offset)
    return_pred_original = check_flag("return_pred_original", return_pred_original)
    gs = None if guidance_scale is None else check_number("guidance_scale", guidance_scale)
    guidance_rescale = check_number("guidance_rescale", guidance_rescale)
    if out is None:
        prev, x0 = torch.ops.genkernels.diffusion_step(
            model_output, sample, list(coeffs), gs, history, noise, seed, offset, return_pred_original,
            guidance_rescale, *threshold,
        )
    else:
        prev = out
        x0 = torch.empty_like(out) if return_pred_original else None
        torch.ops.genkernels.diffusion_step_out(
            model_output, sample, list(coeffs), gs, history, noise, seed, offset, out, x0,
            guidance_rescale, *threshold,
        )
    return (prev, x0) if return_pred_original else prev


def gaussian_noise(
    shape: Sequence[int], seed: int, offset: int = 0, *, dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu", out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Standard normal noise from Philox4x32-10 keyed by ``(seed, offset)``: bit-identical on the
    CPU, under CUDA emulation and on any GPU."""
    if out is None:
        out = torch.empty(tuple(shape), dtype=dtype, device=device)
    torch.ops.genkernels.gaussian_noise_(out, check_int("seed", seed), check_int("offset", offset))
    return out


def ddim_step(
    model_output, sample, alpha_prod_t: float, alpha_prod_prev: float, *, prediction_type: str = "epsilon",
    eta: float = 0.0, use_clipped_model_output: bool = False, clip_sample_range: float | None = None,
    dynamic_thresholding_ratio: float | None = None, sample_max_value: float = 1.0, guidance_scale=None,
    guidance_rescale: float = 0.0, noise=None, seed=None, offset: int = 0, out=None,
    return_pred_original: bool = False,
):
    """DDIM (Song et al.): diffusers' ``DDIMScheduler.step``. ``alpha_prod_prev`` is the
    cumulative alpha of the previous timestep (``final_alpha_cumprod`` past the end); noise is
    drawn only when ``eta > 0``."""
    threshold = _threshold(dynamic_thresholding_ratio, sample_max_value, clip_sample_range)
    coeffs = _fused.step_coeffs(
        "ddim", prediction_type, alpha_prod_t=check_number("alpha_prod_t", alpha_prod_t),
        alpha_prod_prev=check_number("alpha_prod_prev", alpha_prod_prev), eta=check_number("eta", eta),
        use_clipped_model_output=check_flag("use_clipped_model_output", use_clipped_model_output),
        clip=_clip(clip_sample_range), keep_x0=threshold[0] > 0,
    )
    return _run(coeffs, model_output, sample, guidance_scale=guidance_scale, noise=noise, seed=seed, offset=offset,
                out=out, return_pred_original=return_pred_original, guidance_rescale=guidance_rescale,
                threshold=threshold)


def ddpm_step(
    model_output, sample, alpha_prod_t: float, alpha_prod_prev: float, *, prediction_type: str = "epsilon",
    variance_type: str = "fixed_small", add_noise: bool = True, clip_sample_range: float | None = None,
    dynamic_thresholding_ratio: float | None = None, sample_max_value: float = 1.0, guidance_scale=None,
    guidance_rescale: float = 0.0, noise=None, seed=None, offset: int = 0, out=None,
    return_pred_original: bool = False,
):
    """DDPM (Ho et al.): diffusers' ``DDPMScheduler.step`` for ``variance_type`` ``fixed_small``
    or ``fixed_large``; ``add_noise`` is diffusers' ``t > 0``."""
    if variance_type not in ("fixed_small", "fixed_large"):
        raise ValueError(f"variance_type must be 'fixed_small' or 'fixed_large', got {variance_type!r}")
    threshold = _threshold(dynamic_thresholding_ratio, sample_max_value, clip_sample_range)
    coeffs = _fused.step_coeffs(
        "ddpm", prediction_type, alpha_prod_t=check_number("alpha_prod_t", alpha_prod_t),
        alpha_prod_prev=check_number("alpha_prod_prev", alpha_prod_prev), variance_large=variance_type == "fixed_large",
        add_noise=check_flag("add_noise", add_noise), clip=_clip(clip_sample_range), keep_x0=threshold[0] > 0,
    )
    return _run(coeffs, model_output, sample, guidance_scale=guidance_scale, noise=noise, seed=seed, offset=offset,
                out=out, return_pred_original=return_pred_original, guidance_rescale=guidance_rescale,
                threshold=threshold)


def euler_step(
    model_output, sample, sigma: float, sigma_next: float, *, prediction_type: str = "epsilon",
    gamma: float = 0.0, s_noise: float = 1.0, guidance_scale=None, guidance_rescale: float = 0.0, noise=None,
    seed=None, offset: int = 0, out=None, return_pred_original: bool = False,
):
    """Euler (Karras et al. Algorithm 2): diffusers' ``EulerDiscreteScheduler.step``, with
    ``gamma`` = ``min(s_churn / (len(sigmas) - 1), sqrt(2) - 1)`` inside ``[s_tmin, s_tmax]``."""
    coeffs = _fused.step_coeffs(
        "euler", prediction_type, sigma=check_number("sigma", sigma), sigma_next=check_number("sigma_next", sigma_next),
        gamma=check_number("gamma", gamma), s_noise=check_number("s_noise", s_noise),
    )
    return _run(coeffs, model_output, sample, guidance_scale=guidance_scale, noise=noise, seed=seed, offset=offset,
                out=out, return_pred_original=return_pred_original, guidance_rescale=guidance_rescale)


def euler_ancestral_step(
    model_output, sample, sigma: float, sigma_next: float, *, prediction_type: str = "epsilon",
    guidance_scale=None, guidance_rescale: float = 0.0, noise=None, seed=None, offset: int = 0, out=None,
    return_pred_original: bool = False,
):
    """Euler ancestral: diffusers' ``EulerAncestralDiscreteScheduler.step``."""
    coeffs = _fused.step_coeffs("euler_ancestral", prediction_type, sigma=check_number("sigma", sigma),
                                sigma_next=check_number("sigma_next", sigma_next))
    return _run(coeffs, model_output, sample, guidance_scale=guidance_scale, noise=noise, seed=seed, offset=offset,
                out=out, return_pred_original=return_pred_original, guidance_rescale=guidance_rescale)


def dpmpp_2m_step(
    model_output, sample, sigma: float, sigma_next: float, *, sigma_prev: float | None = None,
    prev_pred_original=None, prediction_type: str = "epsilon", sde: bool = False, flow_sigmas: bool = False,
    dynamic_thresholding_ratio: float | None = None, sample_max_value: float = 1.0, guidance_scale=None,
    guidance_rescale: float = 0.0, noise=None, seed=None, offset: int = 0, out=None,
    return_pred_original: bool = True,
):
    """DPM-Solver++ 2M (midpoint), or its SDE variant: diffusers' ``DPMSolverMultistepScheduler``
    with ``algorithm_type`` ``dpmsolver++`` / ``sde-dpmsolver++``. A second-order step needs
    ``sigma_prev`` and ``prev_pred_original`` (the x0 returned by the previous step); without
    them the step is first order (as at diffusers' first and, with ``lower_order_final``, last
    steps). Returns ``(prev_sample, pred_original_sample)`` by default: keep the second for
    the next step."""
    order = 2 if prev_pred_original is not None else 1
    if order == 2 and sigma_prev is None:
        raise ValueError("sigma_prev is required with prev_pred_original (a second-order step)")
    threshold = _threshold(dynamic_thresholding_ratio, sample_max_value, None)
    coeffs = _fused.step_coeffs(
        "dpmpp_2m", prediction_type, sigma=check_number("sigma", sigma),
        sigma_next=check_number("sigma_next", sigma_next),
        sigma_prev=0.0 if sigma_prev is None else check_number("sigma_prev", sigma_prev), order=order,
        sde=check_flag("sde", sde), flow_sigmas=check_flag("flow_sigmas", flow_sigmas), keep_x0=threshold[0] > 0,
    )
    return _run(coeffs, model_output, sample, guidance_scale=guidance_scale, history=prev_pred_original,
                noise=noise, seed=seed, offset=offset, out=out, return_pred_original=return_pred_original,
                guidance_rescale=guidance_rescale, threshold=threshold)


def flow_euler_step(
    model_output, sample, sigma: float, sigma_next: float, *, stochastic: bool = False, guidance_scale=None,
    guidance_rescale: float = 0.0, noise=None, seed=None, offset: int = 0, out=None,
    return_pred_original: bool = False,
):
    """Flow-matching Euler (SD3 / Flux): diffusers' ``FlowMatchEulerDiscreteScheduler.step``
    (``stochastic`` = its ``stochastic_sampling``); the model predicts the velocity."""
    coeffs = _fused.step_coeffs(
        "flow_euler", "flow_prediction", sigma=check_number("sigma", sigma),
        sigma_next=check_number("sigma_next", sigma_next), sde=check_flag("stochastic", stochastic),
    )
    return _run(coeffs, model_output, sample, guidance_scale=guidance_scale, noise=noise, seed=seed, offset=offset,
                out=out, return_pred_original=return_pred_original, guidance_rescale=guidance_rescale)


def _clip(clip_sample_range: float | None) -> float:
    if clip_sample_range is None:
        return 0.0
    clip_sample_range = check_number("clip_sample_range", clip_sample_range)
    if not clip_sample_range > 0:
        raise ValueError(f"clip_sample_range must be > 0 or None, got {clip_sample_range!r}")
    return clip_sample_range


def _threshold(ratio: float | None, sample_max_value: float, clip_sample_range: float | None) -> tuple[float, float]:
    """(threshold_ratio, threshold_max) of the op: (0, 1) when dynamic thresholding is off."""
    if ratio is None:
        return (0.0, 1.0)
    ratio = check_number("dynamic_thresholding_ratio", ratio)
    sample_max_value = check_number("sample_max_value", sample_max_value)
    if not 0 < ratio <= 1:
        raise ValueError(f"dynamic_thresholding_ratio must be in (0, 1] or None, got {ratio!r}")
    if not sample_max_value >= 1:
        raise ValueError(f"sample_max_value must be >= 1, got {sample_max_value!r}")
    if clip_sample_range is not None:
        raise ValueError("pass clip_sample_range or dynamic_thresholding_ratio, not both (diffusers thresholds first)")
    return (ratio, sample_max_value)
