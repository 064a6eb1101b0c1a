"""The fused schedulers against diffusers' own, over full trajectories with a fixed noise
sequence: each sampler x prediction type, fp32 / bf16 / fp16, with and without fused guidance.

Reference: diffusers' scheduler fed float64 tensors. Baseline (for the tolerance rule):
diffusers' scheduler in the latent dtype with the pipeline's CFG ops (and ``rescale_noise_cfg``
for the guidance-rescale cases). Noise: every
``randn_tensor`` call (diffusers' and ours, through ``generator=``) returns the next tensor of
one fixed float64 sequence, rounded to the requested dtype.
"""
from __future__ import annotations

import contextlib

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import genkernels.integrations.diffusers as gkd  # noqa: E402
from genkernels.testing import assert_close, emulate_cuda, has_emulation  # noqa: E402

SHAPE = (2, 4, 7, 9)  # odd sizes: exercises the SIMD tails and the unaligned CUDA path


def _ddpm_config(**kw):
    return dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, **kw)


CASES = {
    # name: (diffusers class, fused class, config, steps, step kwargs)
    "ddim": (diffusers.DDIMScheduler, gkd.FusedDDIMScheduler, _ddpm_config(set_alpha_to_one=False), 20, {}),
    "ddim_eta": (diffusers.DDIMScheduler, gkd.FusedDDIMScheduler, _ddpm_config(), 12, {"eta": 0.7}),
    "ddim_clip": (diffusers.DDIMScheduler, gkd.FusedDDIMScheduler, _ddpm_config(clip_sample=True, clip_sample_range=1.5),
                  10, {"eta": 0.3, "use_clipped_model_output": True}),
    "ddpm_small": (diffusers.DDPMScheduler, gkd.FusedDDPMScheduler, _ddpm_config(clip_sample=False), 15, {}),
    "ddpm_large_clip": (diffusers.DDPMScheduler, gkd.FusedDDPMScheduler,
                        _ddpm_config(variance_type="fixed_large", clip_sample=True), 10, {}),
    "euler": (diffusers.EulerDiscreteScheduler, gkd.FusedEulerDiscreteScheduler, _ddpm_config(), 20, {}),
    "euler_churn": (diffusers.EulerDiscreteScheduler, gkd.FusedEulerDiscreteScheduler, _ddpm_config(), 12,
                    {"s_churn": 2.0, "s_noise": 1.003}),
    "euler_ancestral": (diffusers.EulerAncestralDiscreteScheduler, gkd.FusedEulerAncestralDiscreteScheduler,
                        _ddpm_config(), 20, {}),
    "dpmpp_2m": (diffusers.DPMSolverMultistepScheduler, gkd.FusedDPMSolverMultistepScheduler, _ddpm_config(), 20, {}),
    "dpmpp_2m_karras": (diffusers.DPMSolverMultistepScheduler, gkd.FusedDPMSolverMultistepScheduler,
                        _ddpm_config(use_karras_sigmas=True, final_sigmas_type="zero"), 12, {}),
    "dpmpp_2m_sde": (diffusers.DPMSolverMultistepScheduler, gkd.FusedDPMSolverMultistepScheduler,
                     _ddpm_config(algorithm_type="sde-dpmsolver++"), 15, {}),
    "flow_euler": (diffusers.FlowMatchEulerDiscreteScheduler, gkd.FusedFlowMatchEulerDiscreteScheduler,
                   dict(num_train_timesteps=1000, shift=3.0), 20, {}),
    "flow_euler_stochastic": (diffusers.FlowMatchEulerDiscreteScheduler, gkd.FusedFlowMatchEulerDiscreteScheduler,
                              dict(num_train_timesteps=1000, shift=3.0, stochastic_sampling=True), 10, {}),
    # dynamic thresholding (diffusers' _threshold_sample) and guidance rescale (rescale_noise_cfg)
    "ddim_threshold": (diffusers.DDIMScheduler, gkd.FusedDDIMScheduler,
                       _ddpm_config(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=3.0), 12,
                       {"eta": 0.4}),
    "ddpm_threshold": (diffusers.DDPMScheduler, gkd.FusedDDPMScheduler,
                       _ddpm_config(thresholding=True, dynamic_thresholding_ratio=0.95, sample_max_value=2.0), 10, {}),
    "dpmpp_2m_threshold": (diffusers.DPMSolverMultistepScheduler, gkd.FusedDPMSolverMultistepScheduler,
                           _ddpm_config(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=2.5), 12,
                           {}),
    "ddim_rescale": (diffusers.DDIMScheduler, gkd.FusedDDIMScheduler, _ddpm_config(), 10, {"guidance_rescale": 0.7}),
    "euler_rescale": (diffusers.EulerDiscreteScheduler, gkd.FusedEulerDiscreteScheduler, _ddpm_config(), 10,
                      {"guidance_rescale": 0.5}),
}
PREDICTIONS = {
    "ddim": ["epsilon", "v_prediction", "sample"],
    "ddpm": ["epsilon", "v_prediction", "sample"],
    "euler_ancestral": ["epsilon", "v_prediction"],  # diffusers raises for "sample"
    "euler": ["epsilon", "v_prediction", "sample"],
    "dpmpp": ["epsilon", "v_prediction", "sample"],
    "flow": [None],
}
PARAMS = [(c, p) for c in CASES for p in PREDICTIONS[next(k for k in PREDICTIONS if c.startswith(k))]
          if not c.endswith("_rescale") or p == "v_prediction"]  # rescale: the v-prediction models use it

_RANDN_MODULES = [
    "diffusers.schedulers.scheduling_ddim",
    "diffusers.schedulers.scheduling_ddpm",
    "diffusers.schedulers.scheduling_euler_discrete",
    "diffusers.schedulers.scheduling_euler_ancestral_discrete",
    "diffusers.schedulers.scheduling_dpmsolver_multistep",
    "diffusers.schedulers.scheduling_flow_match_euler_discrete",
    "genkernels.integrations.diffusers",
]


@contextlib.contextmanager
def fixed_noise(monkeypatch, sequence):
    """Every randn_tensor call returns the next tensor of `sequence` in the requested dtype."""
    it = iter(sequence)

    def fake_randn(shape, generator=None, device=None, dtype=None, layout=None):
        z = next(it)
        assert tuple(z.shape) == tuple(shape), (z.shape, shape)
        return z.to(dtype=dtype or torch.float32)

    import importlib

    for mod in _RANDN_MODULES:
        monkeypatch.setattr(importlib.import_module(mod), "randn_tensor", fake_randn)
    yield


def rescale_noise_cfg(noise_cfg, noise_pred_text, guidance_rescale=0.0):
    """diffusers' pipeline function of that name (its module imports transformers, which the test
    extra does not install): std over the non-batch dims, then a mix by `guidance_rescale`."""
    dims = list(range(1, noise_pred_text.ndim))
    std_text = noise_pred_text.std(dim=dims, keepdim=True)
    std_cfg = noise_cfg.std(dim=dims, keepdim=True)
    return guidance_rescale * (noise_cfg * (std_text / std_cfg)) + (1 - guidance_rescale) * noise_cfg


def _model(x: torch.Tensor, t, k: int, cond_bias: torch.Tensor, cfg: bool) -> torch.Tensor:
    """A fixed dummy denoiser: smooth in x, different per step, [uncond; cond] under guidance."""
    base = torch.tanh(0.5 * x.double()) * 0.8 + 0.05 * (k % 3)
    if not cfg:
        return (base + cond_bias).to(x.dtype)
    return torch.cat([base, base + cond_bias]).to(x.dtype)


def _trajectory(cls, config, steps, step_kw, dtype, noise, cfg, fused, monkeypatch):
    step_kw = dict(step_kw)
    rescale = step_kw.pop("guidance_rescale", 0.0) if cfg else 0.0  # a guidance option: no effect without cfg
    step_kw.pop("guidance_rescale", None)
    sched = cls.from_config(config)
    sched.set_timesteps(steps)
    gen = torch.Generator().manual_seed(0)
    x = (torch.linspace(-2, 2, torch.Size(SHAPE).numel(), dtype=torch.float64).reshape(SHAPE).sin() * 1.3
         * float(getattr(sched, "init_noise_sigma", 1.0))).to(dtype)  # fmt: skip
    cond_bias = torch.linspace(-0.3, 0.3, x.numel(), dtype=torch.float64).reshape(SHAPE)
    w = 4.5
    with fixed_noise(monkeypatch, noise):
        for k, t in enumerate(sched.timesteps):
            xin = sched.scale_model_input(x, t) if hasattr(sched, "scale_model_input") else x
            mo = _model(xin, t, k, cond_bias, cfg)
            if fused and cfg:
                x = sched.step(mo, t, x, generator=gen, guidance_scale=w, guidance_rescale=rescale,
                               **step_kw).prev_sample  # fmt: skip
            else:
                if cfg:  # the pipeline's CFG ops, in the latent dtype
                    u, c = mo.chunk(2)
                    mo = u + w * (c - u)
                    if rescale:
                        mo = rescale_noise_cfg(mo, c, guidance_rescale=rescale)
                x = sched.step(mo, t, x, generator=gen, **step_kw).prev_sample
    return x


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cfg", [False, True])
@pytest.mark.parametrize("case,prediction", PARAMS)
def test_trajectory_matches_diffusers(case, prediction, cfg, dtype, monkeypatch):
    ref_cls, fused_cls, config, steps, step_kw = CASES[case]
    config = dict(config)
    if prediction is not None:
        config["prediction_type"] = prediction
    noise = [torch.randn(SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(100 + i))
             for i in range(steps)]  # fmt: skip
    ref = _trajectory(ref_cls, config, steps, step_kw, torch.float64, noise, cfg, False, monkeypatch)
    base = _trajectory(ref_cls, config, steps, step_kw, dtype, noise, cfg, False, monkeypatch)
    out = _trajectory(fused_cls, config, steps, step_kw, dtype, noise, cfg, True, monkeypatch)
    assert out.dtype == dtype
    assert_close(f"{case}/{prediction}", out, ref, base)


@pytest.mark.emulated
@pytest.mark.skipif(not has_emulation(), reason="built without CUDA emulation")
@pytest.mark.parametrize("case", ["ddim_clip", "euler_churn", "dpmpp_2m_sde", "flow_euler", "ddim_threshold",
                                  "dpmpp_2m_threshold", "euler_rescale"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_trajectory_emulated_cuda(case, dtype, monkeypatch):
    ref_cls, fused_cls, config, steps, step_kw = CASES[case]
    steps = min(steps, 6)
    noise = [torch.randn(SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(7 + i))
             for i in range(steps)]  # fmt: skip
    ref = _trajectory(ref_cls, config, steps, step_kw, torch.float64, noise, True, False, monkeypatch)
    base = _trajectory(ref_cls, config, steps, step_kw, dtype, noise, True, False, monkeypatch)
    with emulate_cuda():
        out = _trajectory(fused_cls, config, steps, step_kw, dtype, noise, True, True, monkeypatch)
    assert_close(f"emulated {case}", out, ref, base)


def test_philox_noise_when_no_generator():
    """Without generator, the fused scheduler draws Philox noise: reproducible per noise_seed."""
    outs = []
    for _ in range(2):
        s = gkd.FusedEulerAncestralDiscreteScheduler.from_config(_ddpm_config())
        s.noise_seed = 1234
        s.set_timesteps(5)
        x = torch.ones(SHAPE)
        for t in s.timesteps:
            x = s.step(torch.zeros(SHAPE), t, x).prev_sample
        outs.append(x)
    assert torch.equal(outs[0], outs[1])
    assert outs[0].std() > 0.1
