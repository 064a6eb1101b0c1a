"""Fused diffusion steps under pytest-benchmark: every case of the ``diffusion`` suite of
``genkernels.bench`` (DDIM with/without guidance and noise, against diffusers' step + CFG ops
and against separate torch ops; the 50-step loop), for genkernels and for its baseline."""
from __future__ import annotations

import pytest

SUITE = "diffusion"


@pytest.mark.parametrize("which", ["genkernels", "torch"])
def test_diffusion(run_benchmark, case, which):
    run_benchmark(case, which)
