"""merge_attention_states / merge_attention_states_n against the float64 reference, on every
CPU ISA level and on the CUDA kernel through the emulator."""
from __future__ import annotations

import pytest
import torch

import genkernels as gk
from genkernels import reference as ref_mod
from genkernels.testing import assert_close

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
NEG_INF, NAN, POS_INF = float("-inf"), float("nan"), float("inf")


def make_partials(rng, n, b, s, h, d, dtype):
    outs = torch.randn(n, b, s, h, d, generator=rng).to(dtype)
    lses = torch.randn(n, b, h, s, generator=rng) * 4.0
    return outs, lses


def check(outs, lses, out, lse):
    want_out, want_lse = ref_mod.merge_attention_states(outs, lses)
    base_out, _ = ref_mod.merge_attention_states(outs, lses, dtype=torch.float32)
    assert_close("out", out, want_out, baseline=base_out.to(outs.dtype))
    assert_close("lse", lse, want_lse, baseline=want_lse.float())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 2, 3, 8])
@pytest.mark.parametrize("shape", [(1, 1, 1, 8), (2, 7, 3, 64), (1, 5, 2, 129), (3, 1, 4, 7), (1, 2, 1, 256)])
def test_stacked_matches_reference(backend, rng, dtype, n, shape):
    outs, lses = make_partials(rng, n, *shape, dtype)
    out, lse = gk.merge_attention_states_n(outs, lses)
    assert out.shape == shape and out.dtype == dtype and out.is_contiguous()
    assert lse.shape == (shape[0], shape[2], shape[1]) and lse.dtype == torch.float32
    check(outs, lses, out, lse)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_many_partials(backend, rng, dtype):
    """More partials than the CPU kernel gathers at once (64) take its scalar path."""
    outs, lses = make_partials(rng, 70, 1, 3, 2, 24, dtype)
    lses[5] = NEG_INF
    out, lse = gk.merge_attention_states_n(outs, lses)
    check(outs, lses, out, lse)


@pytest.mark.parametrize("dtype", DTYPES)
def test_pair_matches_stacked_reference(backend, rng, dtype):
    outs, lses = make_partials(rng, 2, 2, 9, 4, 96, dtype)
    out, lse = gk.merge_attention_states(outs[0], lses[0], outs[1], lses[1])
    check(outs, lses, out, lse)


@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_inputs(backend, rng, dtype):
    # partial a: a head slice of a wider tensor; partial b: (b, h, s, d) storage viewed as (b, s, h, d);
    # lses: transposed views. Only the last dim is contiguous.
    wide = torch.randn(2, 5, 6, 64, generator=rng).to(dtype)
    out_a = wide[:, :, 1:4]
    out_b = torch.randn(2, 3, 5, 64, generator=rng).to(dtype).transpose(1, 2)
    lse_a = (torch.randn(2, 5, 3, generator=rng) * 3).transpose(1, 2)
    lse_b = torch.randn(2, 3, 5, generator=rng) * 3
    assert not out_a.is_contiguous() and not out_b.is_contiguous() and not lse_a.is_contiguous()
    out, lse = gk.merge_attention_states(out_a, lse_a, out_b, lse_b)
    check(torch.stack([out_a, out_b]), torch.stack([lse_a, lse_b]), out, lse)


def test_stacked_strided(backend, rng):
    big = torch.randn(4, 2, 3, 8, 40, generator=rng)
    outs = big[1:, :, :, ::2]  # (3, 2, 3, 4, 40), non-contiguous in heads and partials
    lses = (torch.randn(3, 2, 4, 3, generator=rng) * 2)[:, :, :, :]
    out, lse = gk.merge_attention_states_n(outs, lses)
    check(outs, lses, out, lse)


@pytest.mark.parametrize("dtype", DTYPES)
def test_empty_partials_contribute_nothing(backend, rng, dtype):
    outs, lses = make_partials(rng, 3, 2, 4, 3, 32, dtype)
    lses[0, 0, 1, 2] = NEG_INF
    outs[0, 0, 2, 1] = NAN  # garbage in an empty partial must not leak
    lses[:, 1, 2, 3] = NEG_INF  # a row where every partial is empty
    outs[:, 1, 3, 2] = NAN
    out, lse = gk.merge_attention_states_n(outs, lses)
    assert torch.isfinite(out).all()
    assert (out[1, 3, 2] == 0).all() and lse[1, 2, 3] == NEG_INF
    check(outs, lses, out, lse)


@pytest.mark.parametrize("bad", [NAN, POS_INF])
@pytest.mark.parametrize("which", [0, 1])
def test_nan_and_posinf_lse_propagate(backend, rng, bad, which):
    outs, lses = make_partials(rng, 2, 1, 3, 2, 16, torch.float32)
    lses[which, 0, 1, 2] = bad
    out, lse = gk.merge_attention_states_n(outs, lses)
    assert torch.isnan(out[0, 2, 1]).all() and torch.isnan(lse[0, 1, 2])
    keep = torch.ones(1, 3, 2, dtype=torch.bool)
    keep[0, 2, 1] = False
    assert torch.isfinite(out[keep]).all()
    check(outs, lses, out, lse)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 2, 3, 8])
def test_long_sequences_special_values(backend, rng, dtype, n):
    # sequences long enough for the CPU kernel's path that computes the statistics of a vector
    # of positions at once (whole blocks and a tail), with every special value inside a block
    outs, lses = make_partials(rng, n, 2, 37, 3, 64, dtype)
    lses[:, 1, 2, 20] = NEG_INF  # a row where every partial is empty
    outs[:, 1, 20, 2] = NAN
    lses[n - 1, 1, 0, 33] = NAN  # poisoned rows: NaN or +inf LSE
    lses[0, 0, 2, 17] = POS_INF
    if n > 1:
        lses[0, 0, 1, 2] = NEG_INF  # an empty partial whose garbage must not leak
        outs[0, 0, 2, 1] = NAN
    out, lse = gk.merge_attention_states_n(outs, lses)
    assert (out[1, 20, 2] == 0).all() and lse[1, 2, 20] == NEG_INF
    assert torch.isnan(out[1, 33, 0]).all() and torch.isnan(lse[1, 0, 33])
    assert torch.isnan(out[0, 17, 2]).all() and torch.isnan(lse[0, 2, 17])
    bad = torch.zeros(2, 37, 3, dtype=torch.bool)
    bad[1, 33, 0] = bad[0, 17, 2] = True
    assert torch.isfinite(out[~bad]).all()
    check(outs, lses, out, lse)
    # the same partials with the LSEs stored (b, s, h) and viewed as (b, h, s): the row-by-row path
    lses_t = lses.transpose(2, 3).contiguous().transpose(2, 3)
    out_t, lse_t = gk.merge_attention_states_n(outs, lses_t)
    torch.testing.assert_close(out_t, out, rtol=2e-6 if dtype == torch.float32 else 1e-2, atol=1e-6, equal_nan=True)
    torch.testing.assert_close(lse_t, lse, rtol=1e-6, atol=1e-6, equal_nan=True)


@pytest.mark.parametrize("n", [1, 2, 5])
def test_many_heads_long_sequence(backend, rng, n):
    # 40 heads x 20 positions: the CPU kernel's blocks then span many heads (up to its scratch
    # size) and a partial vector of positions; under AddressSanitizer (.ci/run) this also checks
    # the block's scratch bounds
    outs, lses = make_partials(rng, n, 2, 20, 40, 16, torch.float32)
    out, lse = gk.merge_attention_states_n(outs, lses)
    check(outs, lses, out, lse)


def test_large_lse_differences_do_not_overflow(backend, rng):
    outs, lses = make_partials(rng, 2, 1, 2, 2, 16, torch.float32)
    lses[0] = 1e4
    lses[1] = -1e4
    out, lse = gk.merge_attention_states_n(outs, lses)
    torch.testing.assert_close(out, outs[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(lse, lses[0], rtol=1e-6, atol=0)


def test_zero_sized_batch(backend):
    outs = torch.randn(2, 0, 3, 2, 8)
    lses = torch.randn(2, 0, 2, 3)
    out, lse = gk.merge_attention_states_n(outs, lses)
    assert out.shape == (0, 3, 2, 8) and lse.shape == (0, 2, 3)


@pytest.mark.parametrize("threads", [1, 2])
def test_thread_counts_agree(rng, threads):
    outs, lses = make_partials(rng, 4, 4, 33, 8, 64, torch.bfloat16)
    gk.set_num_threads(threads)
    try:
        out, lse = gk.merge_attention_states_n(outs, lses)
    finally:
        gk.set_num_threads(None)
    gk.set_num_threads(1)
    try:
        out1, lse1 = gk.merge_attention_states_n(outs, lses)
    finally:
        gk.set_num_threads(None)
    assert torch.equal(out, out1) and torch.equal(lse, lse1)


def test_cpu_and_emulated_cuda_agree(rng):
    from genkernels import testing

    if not testing.has_emulation():
        pytest.skip("built without CUDA emulation")
    outs, lses = make_partials(rng, 3, 2, 5, 4, 64, torch.float32)
    out_cpu, lse_cpu = gk.merge_attention_states_n(outs, lses)
    with testing.emulate_cuda():
        out_emu, lse_emu = gk.merge_attention_states_n(outs, lses)
    torch.testing.assert_close(out_emu, out_cpu, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(lse_emu, lse_cpu, rtol=1e-6, atol=1e-6)


def test_emulated_scalar_fallback_path(rng):
    """head_dim 7 (not a multiple of the 16-byte chunk) takes the CUDA kernel's 1-element path."""
    from genkernels import testing

    if not testing.has_emulation():
        pytest.skip("built without CUDA emulation")
    outs, lses = make_partials(rng, 2, 1, 3, 2, 7, torch.bfloat16)
    with testing.emulate_cuda():
        out, lse = gk.merge_attention_states_n(outs, lses)
    check(outs, lses, out, lse)
