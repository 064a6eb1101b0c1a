"""Merge of partial attention states under pytest-benchmark: every case of the ``merge`` suite
of ``genkernels.bench``, for genkernels and for its PyTorch baseline (grouped per case)."""
from __future__ import annotations

import pytest

SUITE = "merge"


@pytest.mark.parametrize("which", ["genkernels", "torch"])
def test_merge(run_benchmark, case, which):
    run_benchmark(case, which)
