"""pytest-benchmark runs of the cases registered in ``genkernels.bench`` (the same registry as
``python -m genkernels.bench``). ``pytest bench/ --benchmark-only``; ``--bench-quick`` keeps the
small cases; ``--bench-select NAME`` (repeatable) selects suites, ops or case globs."""
from __future__ import annotations

import itertools

import pytest
import torch

from genkernels.bench import registry, runner, timing


def pytest_addoption(parser):
    parser.addoption("--bench-quick", action="store_true", help="only the cases marked quick")
    parser.addoption("--bench-select", action="append", default=[], help="suite, op, tag or case-name glob")


def cases_of(config, suite: str) -> list[registry.Case]:
    """The registered cases of `suite` that the command line selects."""
    chosen = registry.select(config.getoption("--bench-select") or None, quick=config.getoption("--bench-quick"))
    return [c for c in chosen if c.suite == suite]


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        suite = getattr(metafunc.module, "SUITE")
        cases = cases_of(metafunc.config, suite)
        metafunc.parametrize("case", cases, ids=[c.name for c in cases])


@pytest.fixture(scope="session")
def device() -> torch.device:
    return runner.default_device()


@pytest.fixture(scope="session")
def llc_bytes(device) -> int:
    return timing.last_level_cache_bytes(device)


@pytest.fixture
def run_benchmark(benchmark, device, llc_bytes):
    """``run_benchmark(case, which)`` times ``case.genkernels`` ("genkernels") or
    ``case.baseline`` ("torch") over rotated input sets, as the CLI does."""
    return lambda case, which: _run_benchmark(benchmark, case, which, device, llc_bytes)


def _run_benchmark(benchmark, case: registry.Case, which: str, device: torch.device, llc_bytes: int):
    """Times ``case.genkernels`` or ``case.baseline`` over rotated input sets (as the CLI does)."""
    fn = case.genkernels if which == "genkernels" else case.baseline
    if fn is None:
        pytest.skip(f"{case.name} has no baseline")
    sets = runner.build_input_sets(case, device, llc_bytes)
    rotation = itertools.cycle(sets)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def call():
        out = fn(*next(rotation))
        sync()
        return out

    benchmark.group = f"{case.op} {case.shape} {case.dtype_name}"
    benchmark.extra_info.update(impl=which, bytes_moved=case.bytes_moved, flops=case.flops, input_sets=len(sets))
    with torch.inference_mode():
        benchmark(call)
    stats = getattr(benchmark, "stats", None)
    if stats is not None and case.bytes_moved:
        benchmark.extra_info["GB/s (median)"] = case.bytes_moved / stats.stats.median / 1e9
