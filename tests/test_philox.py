"""Philox4x32-10 and its Gaussians: Random123 known answers, bit identity across the CPU ISA
levels and the emulated CUDA kernel, independence from the launch shape, statistics."""
from __future__ import annotations

import math
import os

import pytest
import torch

from genkernels import _native
from genkernels.diffusion import gaussian_noise
from genkernels.testing import emulate_cuda, has_emulation

# Random123 kat_vectors: philox4x32 10, counter[4] key[2] -> output[4]
KAT = [
    ((0x00000000, 0x00000000, 0x00000000, 0x00000000), (0x00000000, 0x00000000),
     (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF),
     (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]  # fmt: skip


@pytest.mark.parametrize("ctr,key,want", KAT)
def test_philox_known_answers(ctr, key, want):
    assert tuple(_native._C.philox4x32_10(*ctr, *key)) == want


def test_noise_depends_only_on_seed_offset_index():
    a = gaussian_noise((1003,), seed=5, offset=2)
    b = gaussian_noise((4000,), seed=5, offset=2)
    assert torch.equal(a, b[:1003])  # element i does not depend on the size (or the grid)
    assert not torch.equal(a, gaussian_noise((1003,), seed=5, offset=3)[:1003])
    assert not torch.equal(a, gaussian_noise((1003,), seed=6, offset=2)[:1003])
    big = (2**40 + 3) & (2**63 - 1)
    assert torch.equal(gaussian_noise((9,), seed=big, offset=big), gaussian_noise((9,), seed=big, offset=big))


@pytest.mark.parametrize("isa", ["baseline", "avx2", "avx512"])
def test_noise_bit_identical_across_isa_levels(isa, monkeypatch):
    detected = _native._C.build_info()["cpu_isa_detected"]
    order = ["baseline", "avx2", "avx512"]
    if detected not in order or order.index(isa) > order.index(detected):
        pytest.skip(f"CPU lacks {isa}")
    want = gaussian_noise((70001,), seed=11, offset=4)
    monkeypatch.setenv("GK_CPU_ISA", isa)
    _native.reload_cpu_isa()
    try:
        got = gaussian_noise((70001,), seed=11, offset=4)
    finally:
        monkeypatch.delenv("GK_CPU_ISA")
        _native.reload_cpu_isa()
    assert torch.equal(got, want)


@pytest.mark.emulated
@pytest.mark.skipif(not has_emulation(), reason="built without CUDA emulation")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_noise_cpu_vs_emulated_cuda_bit_identical(dtype):
    cpu = gaussian_noise((3, 1001), seed=2**40 + 7, offset=9, dtype=dtype)
    with emulate_cuda():
        emu = gaussian_noise((3, 1001), seed=2**40 + 7, offset=9, dtype=dtype)
    assert torch.equal(cpu.view(torch.int16 if dtype != torch.float32 else torch.int32),
                       emu.view(torch.int16 if dtype != torch.float32 else torch.int32))  # fmt: skip


def test_noise_statistics():
    n = 1 << 21
    z = gaussian_noise((n,), seed=12345, offset=0).double()
    se = 1 / math.sqrt(n)
    assert abs(z.mean().item()) < 5 * se
    assert abs(z.var().item() - 1) < 5 * math.sqrt(2) * se
    assert abs(((z - z.mean()) ** 3).mean().item()) < 5 * math.sqrt(15) * se  # skewness
    assert abs((z**4).mean().item() - 3) < 5 * math.sqrt(96) * se  # kurtosis
    for lag in (1, 2, 3, 4, 5):  # neighbours, inside and across Philox groups and Box-Muller pairs
        assert abs((z[lag:] * z[:-lag]).mean().item()) < 5 * se, lag
    # tail: P(|z| > 3) = 0.0026998
    p3 = (z.abs() > 3).double().mean().item()
    assert abs(p3 - 0.0026998) < 5 * math.sqrt(0.0027 / n)
    # consecutive offsets are uncorrelated
    z2 = gaussian_noise((n,), seed=12345, offset=1).double()
    assert abs((z * z2).mean().item()) < 5 * se


def test_noise_bad_input():
    with pytest.raises(ValueError, match="seed"):
        gaussian_noise((4,), seed=-1)
    with pytest.raises(TypeError, match="out"):
        gaussian_noise((4,), seed=1, dtype=torch.int32)
