"""KV-cache decode under pytest-benchmark: every case of the ``decode`` suite of
``genkernels.bench`` (decode attention against PyTorch's folded or GQA SDPA, the per-call
overhead, append_kv_cache and apply_rotary against PyTorch formulations), for genkernels and for
its baseline (grouped per case). The same-loop references (torch.sum, the contiguous cache) are
reported by ``python -m genkernels.bench`` only."""
from __future__ import annotations

import pytest

SUITE = "decode"


@pytest.mark.parametrize("which", ["genkernels", "torch"])
def test_decode(run_benchmark, case, which):
    run_benchmark(case, which)
