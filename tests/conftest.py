"""Shared fixtures: every test runs with poisoned (NaN-filled) outputs; `backend` runs a test
on the CPU kernels at every compiled ISA level and on the CUDA kernels through the emulator."""
from __future__ import annotations

import os

import pytest
import torch

import genkernels
from genkernels import _native, testing


@pytest.fixture(autouse=True)
def _poison_outputs():
    with testing.poison_outputs():
        yield


def _cpu_isas() -> list[str]:
    compiled = genkernels.info()["cpu_isas_compiled"].split(",")
    order = ["baseline", "avx2", "avx512", "neon"]
    best = genkernels.info()["cpu_isa_detected"]
    return [i for i in compiled if i in order and (i == "neon" or order.index(i) <= order.index(best))]


BACKENDS = [f"cpu-{isa}" for isa in _cpu_isas()] + ["emulated"]


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    """Yields "cpu" or "emulated"; the CPU variants force their ISA level via GK_CPU_ISA."""
    name = request.param
    if name == "emulated":
        if not testing.has_emulation():
            pytest.skip("built without CUDA emulation (GK_EMU=OFF)")
        with testing.emulate_cuda():
            yield "emulated"
        return
    monkeypatch.setenv("GK_CPU_ISA", name.split("-", 1)[1])
    _native.reload_cpu_isa()
    try:
        yield "cpu"
    finally:
        monkeypatch.undo()
        _native.reload_cpu_isa()


@pytest.fixture
def rng():
    """A generator with a fresh seed per test (printed, so a failure can be replayed)."""
    seed = int(os.environ.get("GK_TEST_SEED", "0")) or int.from_bytes(os.urandom(4), "little")
    print(f"GK_TEST_SEED={seed}")
    return torch.Generator().manual_seed(seed)
