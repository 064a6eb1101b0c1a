"""The one fused step behind every sampler: argument checks, the native calls, the op
implementations and their fakes (registered in ``genkernels._ops``).

Per element (see csrc/core/diffusion_step.h)::

    m    = uncond + w (cond - uncond)     when guidance_scale is given (model_output = [uncond; cond])
    m    = k_b m                          guidance_rescale (diffusers' rescale_noise_cfg), per item b
    x0   = px x + pm m + pz z             clamped to [-clip, clip] when clip > 0, or dynamically
                                          thresholded: clamp(x0, -s_b, s_b) / s_b
    prev = cx x + cm m + c0 x0 + ch h + cz z

with the scalars from ``step_coeffs`` (float64, csrc/core/diffusion_coeffs.h), z the ``noise``
tensor or Philox Gaussians of ``(seed, offset)``, h the previous x0 (DPM-Solver++ 2M). k_b and
s_b come from a per-sample reduction the kernel runs first (one extra pass over the inputs).

Layout: every tensor must be contiguous (``ValueError`` naming the argument otherwise); the op
never copies an input behind the caller's back. The drop-in schedulers of
``genkernels.integrations.diffusers`` make their inputs contiguous explicitly (documented there).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from .. import _native
from .._checks import FLOAT_DTYPES, check_same_device, check_same_dtype, check_tensor

# gk::Sampler and gk::Prediction in csrc/core/diffusion_coeffs.h
SAMPLER_CODE = {"ddim": 0, "ddpm": 1, "euler": 2, "euler_ancestral": 3, "dpmpp_2m": 4, "flow_euler": 5}
PREDICTION_CODE = {"epsilon": 0, "v_prediction": 1, "sample": 2, "flow_prediction": 3}
PREDICTION_ALIASES = {"original_sample": "sample", "flow": "flow_prediction"}
NUM_COEFFS = 9  # px, pm, pz, cx, cm, c0, ch, cz, clip
SEED_LIMIT = 2**63  # seeds and offsets travel as int64 through the op schema


def prediction_code(prediction_type: str) -> int:
    name = PREDICTION_ALIASES.get(prediction_type, prediction_type)
    if name not in PREDICTION_CODE:
        raise ValueError(
            f"prediction_type must be one of {', '.join(PREDICTION_CODE)}, got {prediction_type!r}"
        )
    return PREDICTION_CODE[name]


@torch.compiler.assume_constant_result  # plain floats in, plain floats out: constants for torch.compile
def step_coeffs(sampler: str, prediction_type: str, **scalars) -> list[float]:
    """The per-step scalars of `sampler` (float64, computed by csrc/core/diffusion_coeffs.h)."""
    if sampler not in SAMPLER_CODE:
        raise ValueError(f"sampler must be one of {', '.join(SAMPLER_CODE)}, got {sampler!r}")
    for name, value in scalars.items():  # an inf sigma passes "> 0" and would give NaN coefficients
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"genkernels: {sampler}: {name} must be a finite number, got {value}")
    coeffs = list(_native._C.diffusion_step_coeffs(SAMPLER_CODE[sampler], prediction_code(prediction_type), **scalars))
    if not all(math.isfinite(c) for c in coeffs):
        raise ValueError(f"genkernels: {sampler}: the step's scalars {scalars} give non-finite coefficients {coeffs}")
    return coeffs


def needs_noise(coeffs: Sequence[float]) -> bool:
    return coeffs[2] != 0.0 or coeffs[7] != 0.0


def needs_history(coeffs: Sequence[float]) -> bool:
    return coeffs[6] != 0.0


def draw_seed() -> int:
    """A fresh seed from torch's default CPU generator (so ``torch.manual_seed`` makes runs
    reproducible); never touches a GPU."""
    return int(torch.randint(0, SEED_LIMIT - 1, (1,), dtype=torch.int64).item())


def _validate(model_output, sample, coeffs, guidance_scale, history, noise, seed, offset, out=None, x0_out=None,
              guidance_rescale=0.0, threshold_ratio=0.0, threshold_max=1.0):
    check_tensor("sample", sample, dtypes=FLOAT_DTYPES, contiguous=True)
    check_tensor("model_output", model_output, dtypes=FLOAT_DTYPES, contiguous=True)
    if len(coeffs) != NUM_COEFFS:
        raise ValueError(f"coeffs must hold {NUM_COEFFS} scalars, got {len(coeffs)}")
    if sample.dim() == 0:
        raise ValueError("sample must have a batch dimension, got a 0-d tensor")
    if guidance_scale is not None and not math.isfinite(guidance_scale):
        raise ValueError(f"guidance_scale must be a finite number or None, got {guidance_scale}")
    if guidance_scale is None:
        if model_output.shape != sample.shape:
            raise ValueError(f"model_output must have the shape of sample {tuple(sample.shape)}, got {tuple(model_output.shape)}")
    else:
        want = (2 * sample.shape[0], *sample.shape[1:])
        if tuple(model_output.shape) != want:
            raise ValueError(
                f"model_output must have shape {want} (the unconditional then the conditional batch) "
                f"with guidance_scale, got {tuple(model_output.shape)}"
            )
    named = {"model_output": model_output, "sample": sample}
    for name, t in (("history", history), ("noise", noise), ("out", out), ("x0_out", x0_out)):
        if t is None:
            continue
        check_tensor(name, t, dtypes=FLOAT_DTYPES, contiguous=True)
        if t.shape != sample.shape:
            raise ValueError(f"{name} must have the shape of sample {tuple(sample.shape)}, got {tuple(t.shape)}")
        named[name] = t
    check_same_dtype(**named)
    check_same_device(**named)
    if guidance_rescale != 0.0 and guidance_scale is None:
        raise ValueError("guidance_rescale needs guidance_scale (it rescales the guided prediction)")
    if not 0.0 <= guidance_rescale <= 1.0:
        raise ValueError(f"guidance_rescale must be in [0, 1], got {guidance_rescale}")
    if threshold_ratio != 0.0:
        if not 0.0 < threshold_ratio <= 1.0:
            raise ValueError(f"dynamic_thresholding_ratio must be in (0, 1], got {threshold_ratio}")
        if not threshold_max >= 1.0:
            raise ValueError(f"sample_max_value must be >= 1 with dynamic thresholding, got {threshold_max}")
        if coeffs[8] != 0.0:
            raise ValueError("clip_sample_range and dynamic thresholding are exclusive (diffusers thresholds first)")
    if needs_history(coeffs) and history is None:
        raise ValueError("history (the previous step's pred_original_sample) is required for this step")
    for name, v in (("seed", seed), ("offset", offset)):
        if not 0 <= v < SEED_LIMIT:
            raise ValueError(f"{name} must be in [0, 2**63), got {v}")


def _launch(model_output, sample, coeffs, guidance_scale, history, noise, seed, offset, out, x0_out,
            guidance_rescale, threshold_ratio, threshold_max):
    n = sample.numel()
    batch = sample.shape[0]
    uncond = model_output.data_ptr()
    cond = uncond + n * model_output.element_size() if guidance_scale is not None else 0
    h = history if history is not None and needs_history(coeffs) else None
    z = noise if noise is not None and needs_noise(coeffs) else None
    reduce = guidance_rescale != 0.0 or threshold_ratio != 0.0
    # {k_b, s_b} per batch item, written by the kernel's reduction pass
    per_sample = torch.empty(2 * batch if reduce else 0, dtype=torch.float32, device=sample.device)
    _native._C.diffusion_step(
        _native.device_code(sample), _native.DTYPE_CODE[sample.dtype], n, uncond, cond,
        1.0 if guidance_scale is None else float(guidance_scale),
        sample.data_ptr(), _native.ptr(h), _native.ptr(z), out.data_ptr(), _native.ptr(x0_out),
        *coeffs, seed, offset, _native.stream_of(sample), _native.num_threads(),
        max(batch, 1), float(guidance_rescale), float(threshold_ratio), float(threshold_max),
        per_sample.data_ptr() if reduce else 0,
    )  # fmt: skip


def step_impl(model_output, sample, coeffs, guidance_scale, history, noise, seed, offset, return_x0,
              guidance_rescale=0.0, threshold_ratio=0.0, threshold_max=1.0):
    opts = (guidance_rescale, threshold_ratio, threshold_max)
    _validate(model_output, sample, coeffs, guidance_scale, history, noise, seed, offset, None, None, *opts)
    out = torch.empty(sample.shape, dtype=sample.dtype, device=sample.device)
    x0 = torch.empty(sample.shape if return_x0 else (0,), dtype=sample.dtype, device=sample.device)
    _launch(model_output, sample, coeffs, guidance_scale, history, noise, seed, offset, out,
            x0 if return_x0 else None, *opts)  # fmt: skip
    return out, x0


def step_fake(model_output, sample, coeffs, guidance_scale, history, noise, seed, offset, return_x0,
              guidance_rescale=0.0, threshold_ratio=0.0, threshold_max=1.0):
    opts = (guidance_rescale, threshold_ratio, threshold_max)
    _validate(model_output, sample, coeffs, guidance_scale, history, noise, seed, offset, None, None, *opts)
    out = torch.empty(sample.shape, dtype=sample.dtype, device=sample.device)
    return out, torch.empty(sample.shape if return_x0 else (0,), dtype=sample.dtype, device=sample.device)


def step_out_impl(model_output, sample, coeffs, guidance_scale, history, noise, seed, offset, out, x0_out,
                  guidance_rescale=0.0, threshold_ratio=0.0, threshold_max=1.0):
    opts = (guidance_rescale, threshold_ratio, threshold_max)
    _validate(model_output, sample, coeffs, guidance_scale, history, noise, seed, offset, out, x0_out, *opts)
    _launch(model_output, sample, coeffs, guidance_scale, history, noise, seed, offset, out, x0_out, *opts)


def step_out_fake(model_output, sample, coeffs, guidance_scale, history, noise, seed, offset, out, x0_out,
                  guidance_rescale=0.0, threshold_ratio=0.0, threshold_max=1.0):
    opts = (guidance_rescale, threshold_ratio, threshold_max)
    _validate(model_output, sample, coeffs, guidance_scale, history, noise, seed, offset, out, x0_out, *opts)


def gaussian_noise_impl(out, seed, offset):
    check_tensor("out", out, dtypes=FLOAT_DTYPES, contiguous=True)
    for name, v in (("seed", seed), ("offset", offset)):
        if not 0 <= v < SEED_LIMIT:
            raise ValueError(f"{name} must be in [0, 2**63), got {v}")
    _native._C.gaussian_noise(
        _native.device_code(out), _native.DTYPE_CODE[out.dtype], out.data_ptr(), out.numel(), seed, offset,
        _native.stream_of(out), _native.num_threads(),
    )  # fmt: skip


def gaussian_noise_fake(out, seed, offset):
    check_tensor("out", out, dtypes=FLOAT_DTYPES, contiguous=True)
