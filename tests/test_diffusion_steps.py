"""The functional fused steps against the float64 references of genkernels.reference.diffusion
(every sampler, guidance, guidance rescale, dynamic thresholding), the exact quantile of dynamic
thresholding, out= / in-place, in-kernel noise vs a noise tensor, the emulated CUDA kernels,
torch.library.opcheck, and bad input."""
from __future__ import annotations

import contextlib

import pytest
import torch

from genkernels import diffusion as gd
from genkernels.reference import diffusion as ref
from genkernels.testing import assert_close, emulate_cuda, has_emulation

SHAPE = (2, 4, 13, 11)


def _inputs(dtype, cfg=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(SHAPE, generator=g).to(dtype)
    mo = torch.randn((2 * SHAPE[0], *SHAPE[1:]) if cfg else SHAPE, generator=g).to(dtype)
    return mo, x


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cfg", [None, 7.5])
def test_ddim_step_matches_reference_and_out(dtype, cfg):
    mo, x = _inputs(dtype, cfg is not None)
    z = gd.gaussian_noise(SHAPE, seed=3, dtype=dtype)
    want, _ = ref.ddim_step(mo, x, 0.3, 0.5, eta=0.8, noise=z, guidance_scale=cfg)
    base, _ = ref.ddim_step(mo, x, 0.3, 0.5, eta=0.8, noise=z, guidance_scale=cfg, dtype=dtype)  # torch in the dtype
    out = gd.ddim_step(mo, x, 0.3, 0.5, eta=0.8, noise=z, guidance_scale=cfg)
    assert_close("ddim", out, want, base)
    # in-kernel Philox with the same (seed, offset) is the same noise (a bf16/fp16 noise tensor is rounded)
    philox = gd.ddim_step(mo, x, 0.3, 0.5, eta=0.8, seed=3, offset=0, guidance_scale=cfg)
    if dtype == torch.float32:
        assert torch.equal(philox, out)
    else:
        assert_close("ddim philox", philox, want, base)
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
    kw = dict(sigma_prev=9.0, prev_pred_original=hist, sde=True, guidance_scale=3.0)
    z = gd.gaussian_noise(SHAPE, seed=77, offset=5)  # the Philox noise of (77, 5), in fp32
    cpu_prev, cpu_x0 = gd.dpmpp_2m_step(mo, x, 7.0, 4.0, seed=77, offset=5, return_pred_original=True, **kw)
    with emulate_cuda():
        emu_prev, emu_x0 = gd.dpmpp_2m_step(mo, x, 7.0, 4.0, seed=77, offset=5, return_pred_original=True, **kw)
    want_prev, want_x0 = ref.dpmpp_2m_step(mo, x, 7.0, 4.0, noise=z, **kw)
    base_prev, base_x0 = ref.dpmpp_2m_step(mo, x, 7.0, 4.0, noise=z.to(dtype), dtype=dtype, **kw)
    for name, got in (("cpu", (cpu_prev, cpu_x0)), ("emulated", (emu_prev, emu_x0))):
        assert_close(f"{name} prev", got[0], want_prev, base_prev)
        assert_close(f"{name} x0", got[1], want_x0, base_x0)


# name: (genkernels step, reference step, positional schedule scalars, keyword options)
STEPS = {
    "ddim": (gd.ddim_step, ref.ddim_step, (0.05, 0.2), dict(eta=0.6)),
    "ddim_clip_v": (gd.ddim_step, ref.ddim_step, (0.3, 0.5),
                    dict(prediction_type="v_prediction", clip_sample_range=1.2, use_clipped_model_output=True)),
    "ddim_threshold": (gd.ddim_step, ref.ddim_step, (0.05, 0.2),
                       dict(eta=0.3, dynamic_thresholding_ratio=0.9, sample_max_value=4.0)),
    "ddpm_threshold_sample": (gd.ddpm_step, ref.ddpm_step, (0.2, 0.4),
                              dict(prediction_type="sample", dynamic_thresholding_ratio=0.8, sample_max_value=1.5)),
    "ddpm_large": (gd.ddpm_step, ref.ddpm_step, (0.2, 0.4), dict(variance_type="fixed_large")),
    "euler_churn": (gd.euler_step, ref.euler_step, (3.0, 2.0), dict(gamma=0.3, s_noise=1.01)),
    "euler_ancestral_v": (gd.euler_ancestral_step, ref.euler_ancestral_step, (3.0, 2.0),
                          dict(prediction_type="v_prediction")),
    "dpmpp_2m_threshold": (gd.dpmpp_2m_step, ref.dpmpp_2m_step, (3.0, 2.0),
                           dict(sigma_prev=5.0, dynamic_thresholding_ratio=0.95, sample_max_value=2.0)),
    "dpmpp_2m_sde_flow": (gd.dpmpp_2m_step, ref.dpmpp_2m_step, (0.7, 0.5),
                          dict(sigma_prev=0.8, sde=True, flow_sigmas=True, prediction_type="flow_prediction")),
    "flow_euler_stochastic": (gd.flow_euler_step, ref.flow_euler_step, (0.7, 0.5), dict(stochastic=True)),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rescale", [0.0, 0.7])
@pytest.mark.parametrize("name", list(STEPS))
def test_step_matches_float64_reference(name, rescale, dtype):
    """prev and x0 of every sampler against an independent float64 computation (diffusers'
    formulas), with guidance, guidance rescale and in-kernel Philox noise."""
    step, reference, scalars, kw = STEPS[name]
    mo, x = _inputs(dtype, cfg=True, seed=sum(map(ord, name)))
    kw = dict(kw, guidance_scale=5.0, guidance_rescale=rescale)
    if "sigma_prev" in kw:
        kw["prev_pred_original"] = torch.randn(SHAPE).to(dtype)
    z = gd.gaussian_noise(SHAPE, seed=9, offset=2)
    prev, x0 = step(mo, x, *scalars, seed=9, offset=2, return_pred_original=True, **kw)
    want_prev, want_x0 = reference(mo, x, *scalars, noise=z, **kw)
    base_prev, base_x0 = reference(mo, x, *scalars, noise=z.to(dtype), dtype=dtype, **kw)
    assert_close(f"{name} prev", prev, want_prev, base_prev)
    if want_x0 is not None:
        assert_close(f"{name} x0", x0, want_x0, base_x0)


def _quantile_case(shape, ties):
    g = torch.Generator().manual_seed(sum(shape))
    x = 3 * torch.randn(shape, generator=g)
    if ties:  # many equal |x0| values around the quantile: the selection must count equals
        x = (x * 2).round() / 2
    return x


@pytest.mark.parametrize("emulated", [False, True])
@pytest.mark.parametrize("shape,ratio,ties", [
    ((2, 4, 13, 11), 0.9, False), ((3, 1000), 0.995, False), ((1, 7), 0.5, False), ((2, 129), 1.0, False),
    ((4, 257), 0.9, True), ((2, 1, 1), 0.3, False),
])  # fmt: skip
def test_threshold_is_torch_quantile(shape, ratio, ties, emulated):
    """With prediction_type="sample", x0 is the model output itself: the kernel's threshold must
    be torch.quantile's (linear interpolation) of those values, to fp32 rounding."""
    if emulated and not has_emulation():
        pytest.skip("built without CUDA emulation")
    mo = _quantile_case(shape, ties)
    x = torch.randn(shape)
    ctx = emulate_cuda() if emulated else contextlib.nullcontext()
    with ctx:
        _, x0 = gd.ddim_step(mo, x, 0.3, 0.5, prediction_type="sample", dynamic_thresholding_ratio=ratio,
                             sample_max_value=1e6, return_pred_original=True)  # fmt: skip
    flat = mo.reshape(shape[0], -1)
    s = torch.quantile(flat.abs(), ratio, dim=1, keepdim=True).clamp(min=1)
    want = (torch.clamp(flat, -s, s) / s).reshape(shape)
    assert_close("thresholded x0", x0, want)


@pytest.mark.parametrize("shape", [(4, 5000), (1, 40000)])  # one item per thread / all threads on one item
def test_cpu_reduction_paths_match_reference(shape):
    g = torch.Generator().manual_seed(shape[0])
    mo = torch.randn((2 * shape[0], shape[1]), generator=g)
    x = 2 * torch.randn(shape, generator=g)
    kw = dict(guidance_scale=6.0, guidance_rescale=0.6, dynamic_thresholding_ratio=0.97, sample_max_value=3.0)
    prev, x0 = gd.ddim_step(mo, x, 0.05, 0.2, return_pred_original=True, **kw)
    want_prev, want_x0 = ref.ddim_step(mo, x, 0.05, 0.2, **kw)
    base_prev, base_x0 = ref.ddim_step(mo, x, 0.05, 0.2, dtype=torch.float32, **kw)
    assert_close("prev", prev, want_prev, base_prev)
    assert_close("x0", x0, want_x0, base_x0)


def test_threshold_rank_rounds_like_torch():
    """torch.quantile forms the rank q (n - 1) in the input dtype: with n = 3e6 the fp32 rank is
    an integer (the float64 one is not), so s is exactly the order statistic, not a lerp."""
    n = 3_000_000
    v = torch.arange(n, dtype=torch.float32)
    lo = int(torch.tensor(0.995) * float(n - 1))
    v[lo + 1 :] += 1e4  # a large gap after the order statistic: any interpolation would show
    mo = v.view(1, n)
    _, x0 = gd.ddim_step(mo, torch.zeros(1, n), 0.3, 0.5, prediction_type="sample", dynamic_thresholding_ratio=0.995,
                         sample_max_value=1e9, return_pred_original=True)  # fmt: skip
    s = torch.quantile(mo, 0.995, dim=1, keepdim=True)
    assert s.item() == v[lo].item()
    assert torch.equal(x0, torch.clamp(mo, -s, s) / s)


@pytest.mark.emulated
@pytest.mark.skipif(not has_emulation(), reason="built without CUDA emulation")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_emulated_reduction_matches_reference(dtype):
    """The CUDA reduction launch (guidance-rescale sums + radix-select quantile) then the step,
    under emulation, against the float64 reference; a batch item boundary inside a 16-byte chunk."""
    shape = (3, 5, 7)  # 35 elements per item: chunks straddle items
    g = torch.Generator().manual_seed(5)
    mo = torch.randn((6, 5, 7), generator=g).to(dtype)
    x = (2 * torch.randn(shape, generator=g)).to(dtype)
    kw = dict(guidance_scale=4.0, guidance_rescale=0.5, dynamic_thresholding_ratio=0.9, sample_max_value=3.0)
    with emulate_cuda():
        prev, x0 = gd.ddpm_step(mo, x, 0.1, 0.3, add_noise=False, return_pred_original=True, **kw)
    want_prev, want_x0 = ref.ddpm_step(mo, x, 0.1, 0.3, add_noise=False, **kw)
    base_prev, base_x0 = ref.ddpm_step(mo, x, 0.1, 0.3, add_noise=False, dtype=dtype, **kw)
    assert_close("emulated prev", prev, want_prev, base_prev)
    assert_close("emulated x0", x0, want_x0, base_x0)


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
    # strided inputs are rejected by name, never copied behind the caller's back
    xt = torch.randn(SHAPE[::-1]).permute(3, 2, 1, 0)
    with pytest.raises(ValueError, match="sample must be contiguous"):
        gd.ddim_step(mo, xt, 0.3, 0.5)
    with pytest.raises(ValueError, match="model_output must be contiguous"):
        gd.ddim_step(xt, x, 0.3, 0.5)
    with pytest.raises(ValueError, match="noise must be contiguous"):
        gd.ddim_step(mo, x, 0.3, 0.5, eta=1.0, noise=xt)
    with pytest.raises(ValueError, match="history must be contiguous"):
        gd.dpmpp_2m_step(mo, x, 3.0, 2.0, sigma_prev=4.0, prev_pred_original=xt)
    with pytest.raises(ValueError, match="guidance_rescale needs guidance_scale"):
        gd.ddim_step(mo, x, 0.3, 0.5, guidance_rescale=0.7)
    with pytest.raises(ValueError, match="not both"):
        gd.ddim_step(mo, x, 0.3, 0.5, clip_sample_range=1.0, dynamic_thresholding_ratio=0.9)
    with pytest.raises(ValueError, match="dynamic_thresholding_ratio"):
        gd.ddpm_step(mo, x, 0.3, 0.5, dynamic_thresholding_ratio=1.5)
    with pytest.raises(ValueError, match="sample_max_value"):
        gd.ddpm_step(mo, x, 0.3, 0.5, dynamic_thresholding_ratio=0.9, sample_max_value=0.5)
    with pytest.raises(ValueError, match="dynamic thresholding is supported"):
        gd.samplers._fused.step_coeffs("euler", "epsilon", sigma=1.0, sigma_next=0.5, keep_x0=True)
    # non-finite scalars are named, never turned into NaN latents (an inf sigma passes "> 0")
    nan, inf = float("nan"), float("inf")
    for name, call in (("sigma", lambda: gd.euler_step(mo, x, inf, 0.5)),
                       ("sigma", lambda: gd.flow_euler_step(mo, x, inf, 0.5)),
                       ("s_noise", lambda: gd.euler_step(mo, x, 1.0, 0.5, gamma=0.1, s_noise=inf, seed=1)),
                       ("sigma_prev", lambda: gd.dpmpp_2m_step(mo, x, 3.0, 2.0, sigma_prev=inf, prev_pred_original=x)),
                       ("eta", lambda: gd.ddim_step(mo, x, 0.3, 0.5, eta=inf, seed=1)),
                       ("guidance_scale", lambda: gd.ddim_step(torch.cat([mo, mo]), x, 0.3, 0.5, guidance_scale=nan)),
                       ("guidance_scale", lambda: gd.euler_step(torch.cat([mo, mo]), x, 1.0, 0.5, guidance_scale=inf))):
        with pytest.raises(ValueError, match=f"{name} must be a finite number"):
            call()
    # options of the wrong type are named, not coerced (bool("no") is True, int(1.5) is 1)
    for name, call in (("add_noise must be a bool", lambda: gd.ddpm_step(mo, x, 0.3, 0.5, add_noise="no")),
                       ("sde must be a bool", lambda: gd.dpmpp_2m_step(mo, x, 1.0, 0.5, sde="no", seed=1)),
                       ("stochastic must be a bool", lambda: gd.flow_euler_step(mo, x, 1.0, 0.5, stochastic="no")),
                       ("return_pred_original must be a bool",
                        lambda: gd.euler_step(mo, x, 1.0, 0.5, return_pred_original="no")),
                       ("seed must be an int", lambda: gd.ddpm_step(mo, x, 0.3, 0.5, seed=1.5)),
                       ("offset must be an int", lambda: gd.ddpm_step(mo, x, 0.3, 0.5, seed=1, offset="2")),
                       ("sigma must be a number", lambda: gd.euler_step(mo, x, "1.0", 0.5)),
                       ("guidance_scale must be a number",
                        lambda: gd.euler_step(torch.cat([mo, mo]), x, 1.0, 0.5, guidance_scale="2")),
                       ("clip_sample_range must be a number",
                        lambda: gd.ddim_step(mo, x, 0.3, 0.5, clip_sample_range="1")),
                       ("seed must be an int", lambda: gd.gaussian_noise((4,), 1.5))):
        with pytest.raises(TypeError, match=name):
            call()
    # what diffusers code passes stays accepted: 0-d tensors for scalars, t > 0 tensors for flags
    want = gd.ddpm_step(mo, x, 0.3, 0.5, add_noise=True, seed=3)
    torch.testing.assert_close(gd.ddpm_step(mo, x, torch.tensor(0.3, dtype=torch.float64), 0.5,
                                            add_noise=torch.tensor(7) > 0, seed=3), want, rtol=0, atol=0)
