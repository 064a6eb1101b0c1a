"""The benchmark case registry shared by ``python -m genkernels.bench`` and the pytest-benchmark
suites in ``bench/``: one list of cases, so the two never measure different things."""
from __future__ import annotations

import fnmatch
import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

DTYPE_NAME = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@dataclass(frozen=True)
class Companion:
    """A reference timed in the same loop as a case's op and its baseline, batch for batch
    (``timing.measure_interleaved``), so that the ratio between them holds even while the
    machine's speed drifts. It takes the case's inputs. ``report`` says what the table shows:
    "time", the op's time over the companion's (e.g. a paged cache against the contiguous one);
    "rate", the op's rate as a fraction of the companion's when the companion moves the same
    bytes (e.g. ``torch.sum`` over the same KV cache: the fraction of what the machine reads)."""

    label: str
    fn: Callable[..., Any]
    report: str = "time"

    def __post_init__(self):
        if self.report not in ("time", "rate"):
            raise ValueError(f"Companion.report must be 'time' or 'rate', got {self.report!r}")


@dataclass(frozen=True)
class Case:
    """One measurement: the genkernels op and its PyTorch baseline on the same inputs.

    ``make_inputs(device, generator)`` returns the argument tuple both callables take; the
    runner builds several such tuples and rotates over them so their total exceeds the last
    level cache (``cold=False`` keeps one warm set, for per-call overhead cases).
    ``bytes_moved`` (compulsory global-memory traffic) and ``flops`` give the achieved rate;
    ``bound`` says which measured peak it is compared with ("memory": copy bandwidth,
    "compute": GEMM peak of the dtype). ``size`` is the x axis of the scaling plot.
    ``companions`` are references timed interleaved with the op (see ``Companion``).
    ``read_bytes``, when some callable reads only part of an input set (e.g. the paged decode
    cases, whose sets hold the paged pool and its contiguous copy: each callable reads one of
    the two), is the least any of them reads per call; the rotation is sized so that this many
    bytes per set still span ``timing.LLC_SPAN`` last-level caches (default: the whole set)."""

    suite: str
    op: str
    shape: str  # as printed, e.g. "8x(4,1024,32,128)"
    dtype: torch.dtype
    make_inputs: Callable[[torch.device, torch.Generator], tuple]
    genkernels: Callable[..., Any]
    baseline: Callable[..., Any] | None
    bytes_moved: int = 0
    flops: int = 0
    bound: str = "memory"
    size: int = 0
    quick: bool = False  # part of --quick runs
    cold: bool = True
    baseline_label: str = "torch"
    note: str = ""
    tags: tuple[str, ...] = field(default=())
    companions: tuple[Companion, ...] = field(default=())
    read_bytes: int = 0

    @property
    def dtype_name(self) -> str:
        return DTYPE_NAME.get(self.dtype, str(self.dtype).replace("torch.", ""))

    @property
    def name(self) -> str:
        return f"{self.op}/{self.shape}/{self.dtype_name}"

    def matches(self, pattern: str) -> bool:
        """Selected by its suite, op or tag name, or by a glob over its full name."""
        return pattern in (self.suite, self.op, *self.tags) or fnmatch.fnmatchcase(self.name, pattern)


_CASES: list[Case] = []
_loaded = False


def register(case: Case) -> Case:
    if any(c.name == case.name for c in _CASES):
        raise ValueError(f"benchmark case {case.name!r} registered twice")
    _CASES.append(case)
    return case


def load_suites() -> None:
    """Imports every module of ``genkernels.bench.suites``; each registers its cases."""
    global _loaded
    if _loaded:
        return
    from . import suites

    for mod in sorted(pkgutil.iter_modules(suites.__path__), key=lambda m: m.name):
        if not mod.name.startswith("_"):
            importlib.import_module(f"{suites.__name__}.{mod.name}")
    _loaded = True


def all_cases() -> list[Case]:
    load_suites()
    return list(_CASES)


def select(patterns: list[str] | None = None, quick: bool = False) -> list[Case]:
    """Cases matching any of `patterns` (all without patterns), in registration order. An
    unknown pattern raises ValueError naming the suites and ops there are."""
    cases = all_cases()
    if patterns:
        for p in patterns:
            if not any(c.matches(p) for c in cases):
                known = sorted({c.suite for c in cases} | {c.op for c in cases})
                raise ValueError(f"no benchmark case matches {p!r}; suites and ops: {', '.join(known)}")
        cases = [c for c in cases if any(c.matches(p) for p in patterns)]
    if quick:
        cases = [c for c in cases if c.quick]
    return cases
