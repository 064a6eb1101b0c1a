"""Attention in Hugging Face transformers models under pytest-benchmark: every case of the ``hf``
suite of ``genkernels.bench`` (one layer's attention call in a decoding step, through
``attn_implementation="genkernels"`` and through transformers' SDPA function; grouped per case).
The same-loop torch.sum reference is reported by ``python -m genkernels.bench`` only."""
from __future__ import annotations

import pytest

SUITE = "hf"


@pytest.mark.parametrize("which", ["genkernels", "torch"])
def test_hf(run_benchmark, case, which):
    run_benchmark(case, which)
