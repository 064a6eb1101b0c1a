"""End-to-end: a 50-step DDIM loop with classifier-free guidance over a fixed dummy model (a
1x1 conv, i.e. a channel mix, as cheap as the latents' own traffic), diffusers' ``DDIMScheduler`` + the pipeline's CFG ops against
``FusedDDIMScheduler`` with the guidance fused into ``step()``. The model is the same in both,
so the difference is the scheduler's share of a step.

    python -m genkernels.bench.ddim_loop [--batch 2] [--size 128] [--steps 50] [--dtype fp32]

The ``diffusion`` bench suite registers the same loop as the case ``ddim_loop``.
"""
from __future__ import annotations

import argparse
import time

import torch

STEPS = 50
GUIDANCE = 7.5
CHANNELS = 4


def scheduler_config() -> dict:
    """Stable Diffusion's DDIM configuration (built locally: no downloads)."""
    return dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                set_alpha_to_one=False, steps_offset=1, clip_sample=False)  # fmt: skip


class ChannelMix(torch.nn.Module):
    """A fixed 1x1 convolution written as an einsum (oneDNN's 1x1 conv path is slow and erratic
    for 4 channels on this class of machine; the einsum is a plain small GEMM)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.register_buffer("weight", weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("oc,bchw->bohw", self.weight, x)


def dummy_model(dtype: torch.dtype) -> torch.nn.Module:
    """The fixed stand-in for the UNet (deterministic weights)."""
    g = torch.Generator().manual_seed(0)
    return ChannelMix((0.3 * torch.randn((CHANNELS, CHANNELS), generator=g)).to(dtype)).eval()


def make_inputs(batch: int, size: int, dtype: torch.dtype, device="cpu", gen=None):
    latents = torch.randn((batch, CHANNELS, size, size), generator=gen).to(device=device, dtype=dtype)
    return latents, dummy_model(dtype).to(device)


def diffusers_loop(latents, model, steps: int = STEPS):
    """The pipeline's loop: model on [x; x], chunk, CFG ops, diffusers' step."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(scheduler_config())
    sched.set_timesteps(steps)
    x = latents
    with torch.inference_mode():
        for t in sched.timesteps:
            noise_pred = model(torch.cat([x, x]))
            uncond, cond = noise_pred.chunk(2)
            noise_pred = uncond + GUIDANCE * (cond - uncond)
            x = sched.step(noise_pred, t, x).prev_sample
    return x


def fused_loop(latents, model, steps: int = STEPS):
    """The same loop with the un-split model output passed to the fused step."""
    from ..integrations.diffusers import FusedDDIMScheduler

    sched = FusedDDIMScheduler.from_config(scheduler_config())
    sched.set_timesteps(steps)
    x = latents
    with torch.inference_mode():
        for t in sched.timesteps:
            x = sched.step(model(torch.cat([x, x])), t, x, guidance_scale=GUIDANCE).prev_sample
    return x


def model_only_loop(latents, model, steps: int = STEPS):
    """The model calls alone: what no scheduler can save."""
    x = latents
    with torch.inference_mode():
        for _ in range(steps):
            model(torch.cat([x, x]))
    return x


def _median_s(fn, args, repeats: int) -> float:
    times = []
    fn(*args)  # warm-up
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=STEPS)
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    latents, model = make_inputs(args.batch, args.size, dtype, gen=torch.Generator().manual_seed(1))
    ref = diffusers_loop(latents, model, args.steps)
    out = fused_loop(latents, model, args.steps)
    err = (out.double() - ref.double()).abs().max().item()
    t_model = _median_s(model_only_loop, (latents, model, args.steps), args.repeats)
    t_ref = _median_s(diffusers_loop, (latents, model, args.steps), args.repeats)
    t_ours = _median_s(fused_loop, (latents, model, args.steps), args.repeats)
    n = args.steps
    print(f"{n}-step DDIM + CFG, latents ({args.batch},{CHANNELS},{args.size},{args.size}) {args.dtype}, "
          f"threads {torch.get_num_threads()}; max |fused - diffusers| = {err:.2e}")  # fmt: skip
    print(f"  model only         {1e3 * t_model:8.1f} ms  ({1e3 * t_model / n:.3f} ms/step)")
    print(f"  diffusers loop     {1e3 * t_ref:8.1f} ms  ({1e3 * (t_ref - t_model) / n:.3f} ms/step outside the model)")
    print(f"  fused loop         {1e3 * t_ours:8.1f} ms  ({1e3 * (t_ours - t_model) / n:.3f} ms/step outside the model)")
    print(f"  saving             {1e3 * (t_ref - t_ours) / n:.3f} ms/step, {t_ref / t_ours:.2f}x end to end")


if __name__ == "__main__":
    main()
