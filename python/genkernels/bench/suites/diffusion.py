"""Fused DDIM step on SD-sized latents (8,4,128,128) and SD3/Flux-sized ones (1,16,128,128), fp32
and bf16, with and without classifier-free guidance and noise (eta = 1: Philox in the kernel),
cold cache. Two baselines per configuration:

- op ``ddim[...]``: diffusers' ``DDIMScheduler.step()`` after the pipeline's CFG ops
  (``chunk`` then ``uncond + w * (cond - uncond)``), noise from its ``generator``;
- op ``ddim[...]/torch``: the same math as separate torch ops (``chunk``, ``lerp``, the x0 and
  update expressions, ``randn_like``), in the latent dtype.

GB/s counts the compulsory traffic (model output, 1 or 2 halves, and sample read; prev written;
in-kernel noise moves no bytes); "% peak" is that rate over the measured copy bandwidth, so the
bandwidth floor of a step is (% peak)^-1 times its time. ``ddim+cfg+rescale+threshold`` (fp32)
adds guidance rescale and dynamic thresholding (the per-sample reduction pass) against the
pipeline's ``rescale_noise_cfg`` and diffusers' thresholding step. Plus ``ddim_loop``: a 50-step DDIM +
CFG loop over a 1x1-conv dummy model, diffusers against ``FusedDDIMScheduler`` (see
``genkernels.bench.ddim_loop``, which also prints the saving per step).
"""
from __future__ import annotations

import math

import torch

from ... import diffusion as gd
from .. import ddim_loop
from ..registry import Case, register

SUITE = "diffusion"
SHAPES = [(8, 4, 128, 128), (1, 16, 128, 128)]
DTYPES = (torch.float32, torch.bfloat16)
GUIDANCE = 7.5
STEP_INDEX = 10  # of 50: a mid-trajectory timestep
SEED = 1234


def _schedule():
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(ddim_loop.scheduler_config())
    sched.set_timesteps(50)
    t = int(sched.timesteps[STEP_INDEX])
    prev_t = t - 1000 // 50
    return sched, t, float(sched.alphas_cumprod[t]), float(sched.alphas_cumprod[prev_t])


SCHED, T, ALPHA_T, ALPHA_PREV = _schedule()


def _inputs(shape, dtype, cfg):
    def make(device, gen):
        mo_shape = (2 * shape[0], *shape[1:]) if cfg else shape
        mo = torch.randn(mo_shape, generator=gen).to(device=device, dtype=dtype)
        x = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
        return mo, x

    return make


def _fused(cfg, eta):
    w = GUIDANCE if cfg else None
    return lambda mo, x: gd.ddim_step(mo, x, ALPHA_T, ALPHA_PREV, eta=eta, guidance_scale=w, seed=SEED, offset=1)


def _diffusers(cfg, eta):
    gen = torch.Generator().manual_seed(SEED)

    def run(mo, x):
        if cfg:
            uncond, cond = mo.chunk(2)
            mo = uncond + GUIDANCE * (cond - uncond)
        return SCHED.step(mo, T, x, eta=eta, generator=gen if eta > 0 else None).prev_sample

    return run


def _torch_ops(cfg, eta):
    a, ap = ALPHA_T, ALPHA_PREV
    std = eta * math.sqrt((1 - ap) / (1 - a) * (1 - a / ap))

    def run(mo, x):
        if cfg:
            uncond, cond = mo.chunk(2)
            mo = torch.lerp(uncond, cond, GUIDANCE)
        x0 = (x - math.sqrt(1 - a) * mo) / math.sqrt(a)
        prev = math.sqrt(ap) * x0 + math.sqrt(1 - ap - std**2) * mo
        return prev + std * torch.randn_like(x) if eta > 0 else prev

    return run


def bytes_moved(shape, dtype, cfg) -> int:
    n = math.prod(shape)
    return (2 + (2 if cfg else 1)) * n * (torch.finfo(dtype).bits // 8)


for dtype in DTYPES:
    for shape in SHAPES:
        for cfg in (False, True):
            for noise in (False, True):
                eta = 1.0 if noise else 0.0
                op = "ddim" + ("+cfg" if cfg else "") + ("+noise" if noise else "")
                common = dict(
                    suite=SUITE, shape=str(shape).replace(" ", ""), dtype=dtype, make_inputs=_inputs(shape, dtype, cfg),
                    genkernels=_fused(cfg, eta), bytes_moved=bytes_moved(shape, dtype, cfg), bound="memory",
                    size=math.prod(shape), quick=shape[0] == 1 and dtype == torch.float32,
                )  # fmt: skip
                register(Case(op=op, baseline=_diffusers(cfg, eta), baseline_label="diffusers step + CFG ops",
                              tags=("vs_diffusers",), **common))  # fmt: skip
                register(Case(op=op + "/torch", baseline=_torch_ops(cfg, eta), baseline_label="torch ops",
                              tags=("vs_torch",), **common))  # fmt: skip


# ------------------------------------------------------------------ guidance rescale + dynamic thresholding
RESCALE, RATIO, MAX_VALUE = 0.7, 0.995, 1.5
SCHED_THRESHOLD = type(SCHED).from_config(dict(ddim_loop.scheduler_config(), thresholding=True,
                                               dynamic_thresholding_ratio=RATIO, sample_max_value=MAX_VALUE))
SCHED_THRESHOLD.set_timesteps(50)


def _fused_reduce(mo, x):
    return gd.ddim_step(mo, x, ALPHA_T, ALPHA_PREV, guidance_scale=GUIDANCE, guidance_rescale=RESCALE,
                        dynamic_thresholding_ratio=RATIO, sample_max_value=MAX_VALUE)  # fmt: skip


def _diffusers_reduce(mo, x):
    uncond, cond = mo.chunk(2)
    guided = uncond + GUIDANCE * (cond - uncond)
    dims = list(range(1, guided.ndim))  # the pipeline's rescale_noise_cfg
    rescaled = guided * (cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    guided = RESCALE * rescaled + (1 - RESCALE) * guided
    return SCHED_THRESHOLD.step(guided, T, x).prev_sample


for shape in SHAPES:
    register(Case(
        suite=SUITE, op="ddim+cfg+rescale+threshold", shape=str(shape).replace(" ", ""), dtype=torch.float32,
        make_inputs=_inputs(shape, torch.float32, True), genkernels=_fused_reduce, baseline=_diffusers_reduce,
        baseline_label="diffusers step (thresholding) + CFG ops + rescale_noise_cfg",
        bytes_moved=bytes_moved(shape, torch.float32, True), bound="memory", size=math.prod(shape),
        tags=("vs_diffusers",), note="the reduction pass reads the inputs again: the floor counts one pass",
    ))  # fmt: skip


# ------------------------------------------------------------------ end to end
LOOP_SHAPE = (2, ddim_loop.CHANNELS, 128, 128)


def _loop_inputs(device, gen):
    return ddim_loop.make_inputs(LOOP_SHAPE[0], LOOP_SHAPE[2], torch.float32, device, gen)


register(Case(
    suite=SUITE, op="ddim_loop", shape=f"50x{str(LOOP_SHAPE).replace(' ', '')}", dtype=torch.float32,
    make_inputs=_loop_inputs, genkernels=ddim_loop.fused_loop, baseline=ddim_loop.diffusers_loop,
    baseline_label="diffusers DDIMScheduler + CFG ops", cold=False, size=math.prod(LOOP_SHAPE), tags=("e2e",),
    note="50-step DDIM + CFG over a 1x1-conv dummy model; saving per step = (torch us - genkernels us) / 50",
))  # fmt: skip
