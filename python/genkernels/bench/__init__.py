"""Microbenchmarks: ``python -m genkernels.bench [suite-or-case ...]`` and ``pytest bench/``.

Each case times a genkernels op and its PyTorch baseline (the same math in ordinary torch ops)
on the same inputs, on the default device (CUDA if available, else CPU), and reports the
medians, the speedup (the median of per-repeat ratios: the op and its baseline are timed in
alternating batches), the achieved GB/s (memory-bound ops) or GFLOP/s (compute-bound ones) and
that rate as a fraction of this machine's measured peak.

Peaks are measured once per run with torch, not with a native kernel of ours: copy bandwidth
(``copy_`` of 256 MiB fp32, read + write bytes), read bandwidth (``torch.sum``), and the
"GEMM peak" of fp32 and bf16, a 2048x2048 ``torch.mm``, which MKL/oneDNN (or cuBLAS) run close
to the FMA peak; it stands in for the FMA peak as the denominator of GFLOP/s fractions.
Memory-bound fractions are of the copy bandwidth, since those ops both read and write.

Adding a suite: drop one module into ``genkernels/bench/suites/`` that calls
``registry.register(Case(...))`` for each case at import; the CLI and ``bench/`` pick it up::

    # genkernels/bench/suites/decode.py
    from ..registry import Case, register
    register(Case(suite="decode", op="decode_attention", shape="(8,1,32,128) kv 4096",
                  dtype=torch.bfloat16, make_inputs=make, genkernels=decode_attention,
                  baseline=decode_attention_torch, bytes_moved=..., size=4096, quick=False))

``make_inputs(device, generator)`` returns the argument tuple both callables take; the runner
builds enough sets to exceed the last-level cache and rotates over them (``cold=False`` for
per-call overhead cases). Mark small cases ``quick=True`` for ``--quick`` and the tests.
"""
from __future__ import annotations

from .registry import Case, all_cases, register, select

__all__ = ["Case", "all_cases", "register", "select"]
