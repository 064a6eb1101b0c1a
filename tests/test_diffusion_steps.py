"""The functional fused steps: out= / in-place, in-kernel noise vs a noise tensor, the emulated
CUDA kernel vs the CPU kernel, torch.library.opcheck, and bad input."""
from __future__ import annotations

import pytest
import torch

from genkernels import diffusion as gd
from genkernels.testing import assert_close, emulate_cuda, has_emulation

SHAPE = (2, 4, 13, 11)


def _inputs(dtype, cfg=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(SHAPE, generator=g).to(dtype)
    mo = torch.randn((2 * SHAPE[0], *SHAPE[1:]) if cfg else SHAPE, generator=g).to(dtype)
    return mo, x


def _ddim_reference(mo, x, a_t, a_prev, eta, noise, w=None):
    """DDIM epsilon step in float64 (diffusers' formula)."""
    mo, x = mo.double(), x.double()
    if w is not None:
        u, c = mo.chunk(2)
        mo = u + w * (c - u)
    x0 = (x - (1 - a_t) ** 0.5 * mo) / a_t**0.5
    var = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    std = eta * var**0.5
    return a_prev**0.5 * x0 + (1 - a_prev - std**2) ** 0.5 * mo + std * noise.double()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cfg", [None, 7.5])
def test_ddim_step_matches_reference_and_out(dtype, cfg):
    mo, x = _inputs(dtype, cfg is not None)
    z = gd.gaussian_noise(SHAPE, seed=3, dtype=dtype)
    ref = _ddim_reference(mo, x, 0.3, 0.5, 0.8, z, cfg)
    u = mo.chunk(2) if cfg else None
    mo_pt = mo if cfg is None else u[0] + cfg * (u[1] - u[0])
    base = _ddim_reference(mo_pt, x, 0.3, 0.5, 0.8, z).to(dtype)  # torch's CFG ops in the dtype, then the step
    out = gd.ddim_step(mo, x, 0.3, 0.5, eta=0.8, noise=z, guidance_scale=cfg)
    assert_close("ddim", out, ref, base)
    # in-kernel Philox with the same (seed, offset) is the same noise (a bf16/fp16 noise tensor is rounded)
    philox = gd.ddim_step(mo, x, 0.3, 0.5, eta=0.8, seed=3, offset=0, guidance_scale=cfg)
    if dtype == torch.float32:
        assert torch.equal(philox, out)
    else:
        assert_close("ddim philox", philox, ref, base)
    # out= and in place
    buf = torch.full_like(x, float("nan"))
    r = gd.ddim_step(mo, x, 0.3, 0.5, eta=0.8, noise=z, guidance_scale=cfg, out=buf)
    assert r is buf and torch.equal(buf, out)
    xi = x.clone()
    gd.ddim_step(mo, xi, 0.3, 0.5, eta=0.8, noise=z, guidance_scale=cfg, out=xi)
    assert torch.equal(xi, out)


def test_return_pred_original_and_clip():
    mo, x = _inputs(torch.float32)
    prev, x0 = gd.ddpm_step(mo, 3 * x, 0.2, 0.4, clip_sample_range=1.0, add_noise=False, return_pred_original=True)
    assert x0.abs().max() <= 1.0 and (x0.abs() == 1.0).any()
    ref_x0 = ((3 * x.double() - 0.8**0.5 * mo.double()) / 0.2**0.5).clamp(-1, 1)
    assert_close("x0", x0, ref_x0)


@pytest.mark.emulated
@pytest.mark.skipif(not has_emulation(), reason="built without CUDA emulation")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n_offset", [0, 1])  # 1: unaligned pointers take the 1-element variant
def test_emulated_cuda_step_matches_cpu(dtype, n_offset):
    mo, x = _inputs(dtype, cfg=True)
    mo = mo.flatten()[n_offset:].clone()[: mo.numel() - 8].view(-1)  # fresh storage
    mo = torch.cat([mo, torch.zeros(8 - 0, dtype=dtype)])[: 2 * x.numel()].view(2 * SHAPE[0], *SHAPE[1:])
    hist = torch.randn(SHAPE).to(dtype)
    if n_offset:
        x = torch.cat([torch.zeros(1, dtype=dtype), x.flatten()])[1:].view(SHAPE)
    kw = dict(sigma_prev=9.0, prev_pred_original=hist, sde=True, seed=77, offset=5, guidance_scale=3.0,
              return_pred_original=True)
    cpu_prev, cpu_x0 = gd.dpmpp_2m_step(mo, x, 7.0, 4.0, **kw)
    with emulate_cuda():
        emu_prev, emu_x0 = gd.dpmpp_2m_step(mo, x, 7.0, 4.0, **kw)
    # same noise bits; the arithmetic may contract differently (FMA), so compare at the dtype's rounding
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(emu_prev.float(), cpu_prev.float(), rtol=tol, atol=tol)
    torch.testing.assert_close(emu_x0.float(), cpu_x0.float(), rtol=tol, atol=tol)


def test_opcheck():
    mo, x = _inputs(torch.float32, cfg=True)
    coeffs = gd.samplers._fused.step_coeffs("ddim", "epsilon", alpha_prod_t=0.3, alpha_prod_prev=0.5, eta=0.5)
    torch.library.opcheck(torch.ops.genkernels.diffusion_step.default, (mo, x, coeffs, 2.0, None, None, 1, 2, True))
    out = torch.empty_like(x)
    torch.library.opcheck(torch.ops.genkernels.diffusion_step_out.default,
                          (mo, x, coeffs, 2.0, None, None, 1, 2, out, None))  # fmt: skip
    torch.library.opcheck(torch.ops.genkernels.gaussian_noise_.default, (torch.empty(5, 7), 3, 4))


def test_compile():
    mo, x = _inputs(torch.float32, cfg=True)

    @torch.compile(fullgraph=True)
    def f(mo, x):
        return gd.ddim_step(mo, x, 0.3, 0.5, guidance_scale=2.0) * 2

    torch.testing.assert_close(f(mo, x), 2 * gd.ddim_step(mo, x, 0.3, 0.5, guidance_scale=2.0))


def test_bad_input():
    mo, x = _inputs(torch.float32)
    with pytest.raises(ValueError, match="model_output must have shape"):
        gd.ddim_step(mo, x, 0.3, 0.5, guidance_scale=2.0)  # not 2 * batch
    with pytest.raises(ValueError, match="model_output must have the shape of sample"):
        gd.ddim_step(mo[:1], x, 0.3, 0.5)
    with pytest.raises(TypeError, match="sample has dtype|they must match"):
        gd.ddim_step(mo, x.half(), 0.3, 0.5)
    with pytest.raises(TypeError, match="sample must have dtype"):
        gd.ddim_step(mo, x.int(), 0.3, 0.5)
    with pytest.raises(ValueError, match="noise must have the shape"):
        gd.ddim_step(mo, x, 0.3, 0.5, eta=1.0, noise=torch.randn(3))
    with pytest.raises(ValueError, match="alpha_prod_t"):
        gd.ddim_step(mo, x, 1.5, 0.5)  # timestep out of range of the schedule
    with pytest.raises(ValueError, match="eta"):
        gd.ddim_step(mo, x, 0.3, 0.5, eta=-1.0)
    with pytest.raises(ValueError, match="prediction_type"):
        gd.ddim_step(mo, x, 0.3, 0.5, prediction_type="bogus")
    with pytest.raises(ValueError, match="flow_prediction"):
        gd.ddim_step(mo, x, 0.3, 0.5, prediction_type="flow_prediction")
    with pytest.raises(ValueError, match="variance_type"):
        gd.ddpm_step(mo, x, 0.3, 0.5, variance_type="learned")
    with pytest.raises(ValueError, match="sigma_prev"):
        gd.dpmpp_2m_step(mo, x, 3.0, 2.0, prev_pred_original=x)
    with pytest.raises(ValueError, match="clip_sample_range"):
        gd.ddim_step(mo, x, 0.3, 0.5, clip_sample_range=-1.0)
    with pytest.raises(ValueError, match="out must be contiguous"):
        gd.ddim_step(mo, x, 0.3, 0.5, out=torch.empty(SHAPE[::-1]).permute(3, 2, 1, 0))
    with pytest.raises(ValueError, match="sigma"):
        gd.euler_step(mo, x, 0.0, 0.0)
