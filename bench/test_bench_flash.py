"""Flash attention forward under pytest-benchmark: every case of the ``flash`` suite of
``genkernels.bench`` for genkernels and for ``scaled_dot_product_attention`` (grouped per case),
plus the extra memory of one call at seqlen 4096 against SDPA's."""
from __future__ import annotations

import subprocess
import sys

import pytest

SUITE = "flash"


@pytest.mark.parametrize("which", ["genkernels", "torch"])
def test_flash(run_benchmark, case, which):
    run_benchmark(case, which)


# Peak RSS growth of one call, measured in a fresh process so earlier allocations don't hide it.
_RSS_SCRIPT = r"""
import resource, sys, torch, torch.nn.functional as F
import genkernels as gk
which, dtype = sys.argv[1], getattr(torch, sys.argv[2])
q, k, v = (torch.randn(1, 4096, 16, 128, dtype=dtype) for _ in range(3))
# both return a new output of q's size: raise the peak by one such buffer first, so the growth
# measured is the memory a call needs beyond its output
out = torch.ones_like(q)
del out
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if which == "genkernels":
    gk.flash_attention(q, k, v, causal=True)
else:
    F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
"""


def _rss_growth_kib(which: str, dtype: str) -> int:
    res = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, which, dtype], capture_output=True, text=True, check=True)
    return int(res.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_extra_memory_at_most_sdpa(dtype, record_property):
    ours, theirs = _rss_growth_kib("genkernels", dtype), _rss_growth_kib("torch", dtype)
    record_property("peak_rss_growth_kib", {"genkernels": ours, "sdpa": theirs})
    print(f"peak RSS growth per call, seqlen 4096, {dtype}: genkernels {ours} KiB, sdpa {theirs} KiB")
    assert ours <= max(theirs, 1024), f"genkernels grew RSS by {ours} KiB, SDPA by {theirs} KiB"
