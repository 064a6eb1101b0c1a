"""Drop-in diffusers schedulers whose ``step()`` is one fused genkernels kernel.

Each class subclasses the diffusers scheduler and keeps its configuration, ``set_timesteps``,
state and ``step()`` signature and return type, so::

    pipe.scheduler = FusedDDIMScheduler.from_config(pipe.scheduler.config)

just works. ``step()`` also takes ``guidance_scale=`` (and ``guidance_rescale=``, the pipeline's
``rescale_noise_cfg`` factor): pass the un-split model output (``[uncond; cond]`` batched as
diffusers does) and the guidance is fused into the step.

Noise: ``variance_noise=`` (where diffusers has it) or a ``generator=`` draw the noise exactly
as diffusers does (``randn_tensor``), for bit-for-bit the same noise; with neither, noise comes
from in-kernel Philox keyed by ``(scheduler.noise_seed, step counter)`` (``noise_seed=None``
draws one seed per step from torch's default generator, so ``torch.manual_seed`` still makes
runs reproducible).

Dynamic thresholding (``thresholding=True``: DDIM, DDPM, DPM-Solver++) and guidance rescale are
fused too (a per-sample reduction pass, then the update). Configurations the kernel does not
cover fall back to diffusers' own ``step()`` (correct, just not fused; guidance is then applied
with the pipeline's ops first): DDPM ``variance_type`` ``learned`` / ``learned_range`` (and
``fixed_small_log``), DPM-Solver ``solver_order`` 3, ``solver_type="heun"`` and the non-++
algorithms (``dpmsolver``, ``sde-dpmsolver``), flow-matching Euler with ``per_token_timesteps``.
Numerics: fp32 math for every sampler, also for fp16/bf16 latents (diffusers computes DDIM and
DDPM in the latent dtype and the sigma-based samplers in fp32): rounded once, on store.
Layout: the fused ops reject strided tensors; these schedulers call ``.contiguous()`` on
``model_output``, ``sample`` and the noise first (a copy only for a strided input).
"""
from __future__ import annotations

import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
)
from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput
from diffusers.schedulers.scheduling_ddpm import DDPMSchedulerOutput
from diffusers.schedulers.scheduling_euler_ancestral_discrete import EulerAncestralDiscreteSchedulerOutput
from diffusers.schedulers.scheduling_euler_discrete import EulerDiscreteSchedulerOutput
from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteSchedulerOutput
from diffusers.schedulers.scheduling_utils import SchedulerOutput
from diffusers.utils.torch_utils import randn_tensor

from ..diffusion import samplers as _steps
from ..diffusion._fused import draw_seed

__all__ = [
    "FusedDDIMScheduler",
    "FusedDDPMScheduler",
    "FusedDPMSolverMultistepScheduler",
    "FusedEulerAncestralDiscreteScheduler",
    "FusedEulerDiscreteScheduler",
    "FusedFlowMatchEulerDiscreteScheduler",
]


class _FusedNoise:
    """Noise plumbing shared by the fused schedulers."""

    noise_seed: int | None = None
    _philox_counter: int = 0

    def _noise_args(self, sample, generator, variance_noise=None):
        """(noise tensor or None, seed, offset) for one step."""
        if variance_noise is not None and generator is not None:
            raise ValueError("pass either generator or variance_noise, not both")
        if variance_noise is not None:
            return variance_noise.to(device=sample.device, dtype=sample.dtype).contiguous(), 0, 0
        if generator is not None:
            noise = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
            return noise, 0, 0
        seed = self.noise_seed if self.noise_seed is not None else draw_seed()
        offset = self._philox_counter
        self._philox_counter += 1
        return None, seed, offset

    @staticmethod
    def _guided(model_output, guidance_scale, guidance_rescale=0.0):
        """For the fallback path: the pipeline's CFG ops and ``rescale_noise_cfg``."""
        if guidance_scale is None:
            return model_output
        uncond, cond = model_output.chunk(2)
        guided = uncond + guidance_scale * (cond - uncond)
        if guidance_rescale:
            dims = list(range(1, guided.ndim))
            rescaled = guided * (cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
            guided = guidance_rescale * rescaled + (1 - guidance_rescale) * guided
        return guided

    def _threshold_kw(self):
        """Dynamic thresholding arguments of the fused step (diffusers: before clip_sample)."""
        c = self.config
        if getattr(c, "thresholding", False):
            return dict(dynamic_thresholding_ratio=c.dynamic_thresholding_ratio, sample_max_value=c.sample_max_value)
        clip = c.clip_sample_range if getattr(c, "clip_sample", False) else None
        return dict(clip_sample_range=clip) if "clip_sample" in c else {}


def _float(x) -> float:
    return float(x.item() if torch.is_tensor(x) else x)


class FusedDDIMScheduler(_FusedNoise, DDIMScheduler):
    """``DDIMScheduler`` with a fused ``step()``: every configuration (prediction types, eta,
    ``clip_sample``, dynamic thresholding, ``use_clipped_model_output``) is fused."""

    def step(self, model_output, timestep, sample, eta=0.0, use_clipped_model_output=False, generator=None,
             variance_noise=None, return_dict=True, guidance_scale=None, guidance_rescale=0.0):
        if self.num_inference_steps is None:
            raise ValueError("Number of inference steps is 'None', you need to run 'set_timesteps' after creating the scheduler")
        model_output, sample = model_output.contiguous(), sample.contiguous()
        t = int(timestep)
        prev_t = t - self.config.num_train_timesteps // self.num_inference_steps
        alpha_prod_t = _float(self.alphas_cumprod[t])
        alpha_prod_prev = _float(self.alphas_cumprod[prev_t]) if prev_t >= 0 else _float(self.final_alpha_cumprod)
        noise, seed, offset = self._noise_args(sample, generator, variance_noise) if eta > 0 else (None, 0, 0)
        prev, x0 = _steps.ddim_step(
            model_output, sample, alpha_prod_t, alpha_prod_prev, prediction_type=self.config.prediction_type,
            eta=eta, use_clipped_model_output=use_clipped_model_output, **self._threshold_kw(),
            guidance_scale=guidance_scale, guidance_rescale=guidance_rescale, noise=noise, seed=seed, offset=offset,
            return_pred_original=True,
        )
        if not return_dict:
            return prev, x0
        return DDIMSchedulerOutput(prev_sample=prev, pred_original_sample=x0)


class FusedDDPMScheduler(_FusedNoise, DDPMScheduler):
    """``DDPMScheduler`` with a fused ``step()`` (variance types fixed_small and fixed_large,
    clipping or dynamic thresholding). Learned variances (``learned``, ``learned_range``) and
    ``fixed_small_log`` fall back to diffusers' ``step()`` (correct, not fused)."""

    def step(self, model_output, timestep, sample, generator=None, return_dict=True, guidance_scale=None,
             guidance_rescale=0.0):
        if self.variance_type not in ("fixed_small", "fixed_large"):  # learned variances: diffusers' step
            return super().step(self._guided(model_output, guidance_scale, guidance_rescale), timestep, sample,
                                generator, return_dict)
        model_output, sample = model_output.contiguous(), sample.contiguous()
        t = int(timestep)
        prev_t = int(self.previous_timestep(t))
        alpha_prod_t = _float(self.alphas_cumprod[t])
        alpha_prod_prev = _float(self.alphas_cumprod[prev_t]) if prev_t >= 0 else 1.0
        noise, seed, offset = self._noise_args(sample, generator) if t > 0 else (None, 0, 0)
        prev, x0 = _steps.ddpm_step(
            model_output, sample, alpha_prod_t, alpha_prod_prev, prediction_type=self.config.prediction_type,
            variance_type=self.variance_type, add_noise=t > 0, **self._threshold_kw(),
            guidance_scale=guidance_scale, guidance_rescale=guidance_rescale, noise=noise, seed=seed, offset=offset,
            return_pred_original=True,
        )
        if not return_dict:
            return prev, x0
        return DDPMSchedulerOutput(prev_sample=prev, pred_original_sample=x0)


class FusedEulerDiscreteScheduler(_FusedNoise, EulerDiscreteScheduler):
    """``EulerDiscreteScheduler`` with a fused ``step()`` (churn noise included)."""

    def step(self, model_output, timestep, sample, s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0,
             generator=None, return_dict=True, guidance_scale=None, guidance_rescale=0.0):
        model_output, sample = model_output.contiguous(), sample.contiguous()
        if isinstance(timestep, int) or (torch.is_tensor(timestep) and not timestep.is_floating_point()):
            raise ValueError("Passing integer indices as timesteps to `EulerDiscreteScheduler.step()` is not supported; pass one of `scheduler.timesteps`.")
        if self.step_index is None:
            self._init_step_index(timestep)
        sigma = _float(self.sigmas[self.step_index])
        sigma_next = _float(self.sigmas[self.step_index + 1])
        gamma = min(s_churn / (len(self.sigmas) - 1), 2**0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
        noise, seed, offset = self._noise_args(sample, generator) if gamma > 0 else (None, 0, 0)
        prev, x0 = _steps.euler_step(
            model_output, sample, sigma, sigma_next, prediction_type=self.config.prediction_type, gamma=gamma,
            s_noise=s_noise, guidance_scale=guidance_scale, guidance_rescale=guidance_rescale, noise=noise, seed=seed,
            offset=offset, return_pred_original=True,
        )
        self._step_index += 1
        if not return_dict:
            return prev, x0
        return EulerDiscreteSchedulerOutput(prev_sample=prev, pred_original_sample=x0)


class FusedEulerAncestralDiscreteScheduler(_FusedNoise, EulerAncestralDiscreteScheduler):
    """``EulerAncestralDiscreteScheduler`` with a fused ``step()``."""

    def step(self, model_output, timestep, sample, generator=None, return_dict=True, guidance_scale=None,
             guidance_rescale=0.0):
        model_output, sample = model_output.contiguous(), sample.contiguous()
        if isinstance(timestep, int) or (torch.is_tensor(timestep) and not timestep.is_floating_point()):
            raise ValueError("Passing integer indices as timesteps to `EulerAncestralDiscreteScheduler.step()` is not supported; pass one of `scheduler.timesteps`.")
        if self.step_index is None:
            self._init_step_index(timestep)
        if self.config.prediction_type == "sample":
            raise NotImplementedError("prediction_type not implemented yet: sample")  # as diffusers
        sigma = _float(self.sigmas[self.step_index])
        sigma_next = _float(self.sigmas[self.step_index + 1])
        noise, seed, offset = self._noise_args(sample, generator)
        prev, x0 = _steps.euler_ancestral_step(
            model_output, sample, sigma, sigma_next, prediction_type=self.config.prediction_type,
            guidance_scale=guidance_scale, guidance_rescale=guidance_rescale, noise=noise, seed=seed, offset=offset,
            return_pred_original=True,
        )
        self._step_index += 1
        if not return_dict:
            return prev, x0
        return EulerAncestralDiscreteSchedulerOutput(prev_sample=prev, pred_original_sample=x0)


class FusedDPMSolverMultistepScheduler(_FusedNoise, DPMSolverMultistepScheduler):
    """``DPMSolverMultistepScheduler`` with a fused ``step()`` for DPM-Solver++ 2M (midpoint) and
    its SDE variant, dynamic thresholding included; the state (``model_outputs``,
    ``lower_order_nums``) is kept as diffusers keeps it. Falls back to diffusers' ``step()``
    (not fused) for ``solver_order=3``, ``solver_type="heun"``, the non-++ algorithms and
    learned variances."""

    def _fusable(self) -> bool:
        c = self.config
        return (c.algorithm_type in ("dpmsolver++", "sde-dpmsolver++") and c.solver_order <= 2
                and c.solver_type == "midpoint" and c.variance_type not in ("learned", "learned_range"))

    def step(self, model_output, timestep, sample, generator=None, variance_noise=None, return_dict=True,
             guidance_scale=None, guidance_rescale=0.0):
        if not self._fusable():
            return super().step(self._guided(model_output, guidance_scale, guidance_rescale), timestep, sample,
                                generator, variance_noise, return_dict)
        model_output, sample = model_output.contiguous(), sample.contiguous()
        if self.num_inference_steps is None:
            raise ValueError("Number of inference steps is 'None', you need to run 'set_timesteps' after creating the scheduler")
        if self.step_index is None:
            self._init_step_index(timestep)
        i = self.step_index
        lower_order_final = (i == len(self.timesteps) - 1) and (
            self.config.euler_at_final
            or (self.config.lower_order_final and len(self.timesteps) < 15)
            or self.config.final_sigmas_type == "zero"
        )
        second = not (self.config.solver_order == 1 or self.lower_order_nums < 1 or lower_order_final)
        sde = self.config.algorithm_type == "sde-dpmsolver++"
        noise, seed, offset = self._noise_args(sample, generator, variance_noise) if sde else (None, 0, 0)
        prev, x0 = _steps.dpmpp_2m_step(
            model_output, sample, _float(self.sigmas[i]), _float(self.sigmas[i + 1]),
            sigma_prev=_float(self.sigmas[i - 1]) if second else None,
            prev_pred_original=self.model_outputs[-1] if second else None,
            prediction_type=self.config.prediction_type, sde=sde, flow_sigmas=bool(self.config.use_flow_sigmas),
            **self._threshold_kw(), guidance_scale=guidance_scale, guidance_rescale=guidance_rescale, noise=noise,
            seed=seed, offset=offset, return_pred_original=True,
        )
        for k in range(self.config.solver_order - 1):
            self.model_outputs[k] = self.model_outputs[k + 1]
        self.model_outputs[-1] = x0
        if self.lower_order_nums < self.config.solver_order:
            self.lower_order_nums += 1
        self._step_index += 1
        if not return_dict:
            return (prev,)
        return SchedulerOutput(prev_sample=prev)


class FusedFlowMatchEulerDiscreteScheduler(_FusedNoise, FlowMatchEulerDiscreteScheduler):
    """``FlowMatchEulerDiscreteScheduler`` (SD3 / Flux) with a fused ``step()``; with
    ``per_token_timesteps`` it falls back to diffusers' ``step()`` (correct, not fused)."""

    def step(self, model_output, timestep, sample, s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0,
             generator=None, per_token_timesteps=None, return_dict=True, guidance_scale=None, guidance_rescale=0.0):
        if per_token_timesteps is not None:  # per-token sigmas: diffusers' step (not fused)
            return super().step(self._guided(model_output, guidance_scale, guidance_rescale), timestep, sample,
                                s_churn, s_tmin, s_tmax, s_noise, generator, per_token_timesteps, return_dict)
        model_output, sample = model_output.contiguous(), sample.contiguous()
        if isinstance(timestep, int) or (torch.is_tensor(timestep) and not timestep.is_floating_point()):
            raise ValueError("Passing integer indices as timesteps to `FlowMatchEulerDiscreteScheduler.step()` is not supported; pass one of `scheduler.timesteps`.")
        if self.step_index is None:
            self._init_step_index(timestep)
        stochastic = bool(self.config.stochastic_sampling)
        noise, seed, offset = self._noise_args(sample, generator) if stochastic else (None, 0, 0)
        prev = _steps.flow_euler_step(
            model_output, sample, _float(self.sigmas[self.step_index]), _float(self.sigmas[self.step_index + 1]),
            stochastic=stochastic, guidance_scale=guidance_scale, guidance_rescale=guidance_rescale, noise=noise,
            seed=seed, offset=offset,
        )
        self._step_index += 1
        if not return_dict:
            return (prev,)
        return FlowMatchEulerDiscreteSchedulerOutput(prev_sample=prev)
