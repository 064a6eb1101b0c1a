"""Fused denoising steps for diffusion samplers (DDPM, DDIM, Euler, Euler ancestral,
DPM-Solver++ 2M, flow-matching Euler) with classifier-free guidance and reproducible Philox
noise. Drop-in diffusers schedulers live in ``genkernels.integrations.diffusers``."""
from __future__ import annotations

from .samplers import (
    ddim_step,
    ddpm_step,
    dpmpp_2m_step,
    euler_ancestral_step,
    euler_step,
    flow_euler_step,
    gaussian_noise,
)

__all__ = [
    "ddim_step",
    "ddpm_step",
    "dpmpp_2m_step",
    "euler_ancestral_step",
    "euler_step",
    "flow_euler_step",
    "gaussian_noise",
]
