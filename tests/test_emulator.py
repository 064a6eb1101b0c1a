"""Tests of the CUDA-on-CPU emulator (csrc/emu) and the emulated PTX wrappers (csrc/cuda/ptx.cuh).

The tests are standalone C++ programs in tests/emu/, compiled here with the host compiler in each
emulator mode and run; they need no GPU, no CUDA toolkit and not the extension module.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
PRIMITIVES = ROOT / "tests" / "emu" / "ptx_primitives_test.cpp"
TSAN = ROOT / "tests" / "emu" / "tsan_barrier_test.cpp"
HAVE_BOOST_CONTEXT = Path("/usr/include/boost/context/fiber.hpp").exists()
CXX = shutil.which("g++")

pytestmark = pytest.mark.skipif(CXX is None, reason="g++ not found: the emulator tests compile C++ programs")

# name -> (source, extra flags). Small files at -O1 keep even the TSan builds to a few seconds.
BUILDS = {
    "ucontext": (PRIMITIVES, []),
    "threads": (PRIMITIVES, ["-DGK_EMU_THREADS", "-pthread"]),
    # the whole primitive suite under TSan: the emulator itself must not produce false reports
    "threads_tsan": (PRIMITIVES, ["-DGK_EMU_THREADS", "-fsanitize=thread", "-g"]),
    "break_layout": (PRIMITIVES, ["-DGK_SELFTEST_BREAK_LAYOUT"]),
    "deadlock": (PRIMITIVES, ["-DGK_SELFTEST_DEADLOCK"]),
    "tsan_ok": (TSAN, ["-DGK_EMU_THREADS", "-fsanitize=thread", "-g"]),
    "tsan_dropped_barrier": (TSAN, ["-DGK_EMU_THREADS", "-fsanitize=thread", "-g", "-DGK_DROP_BARRIER"]),
}
if HAVE_BOOST_CONTEXT:
    BUILDS["boost_context"] = (PRIMITIVES, ["-DGK_EMU_BOOST_CONTEXT", "-lboost_context"])


def _compile(out_dir: Path, name: str) -> tuple[Path, str | None]:
    source, flags = BUILDS[name]
    exe = out_dir / name
    link_flags = [f for f in flags if f.startswith("-l")]
    cmd = [CXX, "-std=c++17", "-O1", "-Wall", "-I", str(CSRC)]
    cmd += [f for f in flags if not f.startswith("-l")] + [str(source), "-o", str(exe)] + link_flags
    proc = subprocess.run(cmd, capture_output=True, text=True)
    return exe, None if proc.returncode == 0 else f"{' '.join(cmd)}\n{proc.stderr}"


@pytest.fixture(scope="session")
def binaries(tmp_path_factory) -> dict[str, tuple[Path, str | None]]:
    """Compiles every build once, two at a time (this machine has 2 cores)."""
    out_dir = tmp_path_factory.mktemp("emu_tests")
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        futures = {name: pool.submit(_compile, out_dir, name) for name in BUILDS}
        return {name: f.result() for name, f in futures.items()}


def _run(binaries, name: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
    exe, error = binaries[name]
    assert error is None, f"compilation failed:\n{error}"
    env = dict(os.environ, TSAN_OPTIONS="halt_on_error=0 exitcode=66")
    start = time.perf_counter()
    proc = subprocess.run([str(exe)], capture_output=True, text=True, timeout=timeout, env=env)
    print(f"{name}: exit {proc.returncode} in {time.perf_counter() - start:.2f} s\n{proc.stdout}{proc.stderr[-4000:]}")
    return proc


def _skip_if_tsan_unusable(proc: subprocess.CompletedProcess) -> None:
    if "unexpected memory mapping" in proc.stderr or "FATAL: ThreadSanitizer" in proc.stderr:
        pytest.skip("ThreadSanitizer cannot run here (kernel memory layout): " + proc.stderr.strip()[:200])


@pytest.mark.parametrize(
    "build",
    [
        pytest.param("boost_context", marks=pytest.mark.skipif(
            not HAVE_BOOST_CONTEXT, reason="Boost.Context headers not installed (libboost-context-dev)")),
        "ucontext",
        "threads",
        "threads_tsan",
    ],
)
def test_ptx_primitives(binaries, build):
    proc = _run(binaries, build)
    if build.endswith("tsan"):
        _skip_if_tsan_unusable(proc)
        assert "ThreadSanitizer" not in proc.stderr, proc.stderr
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "FAIL" not in proc.stdout
    assert proc.stdout.count("PASS") >= 30


def test_primitive_tests_catch_a_swapped_fragment(binaries):
    """Swapping two A registers in the mma kernel must make the mma checks fail: the tests can fail."""
    proc = _run(binaries, "break_layout")
    assert proc.returncode != 0
    failed = [line for line in proc.stdout.splitlines() if line.startswith("FAIL ")]
    assert failed and all("mma" in line for line in failed), proc.stdout


def test_deadlock_is_reported(binaries):
    proc = _run(binaries, "deadlock")
    assert proc.returncode != 0
    assert "DEADLOCK" in proc.stderr and "block (0,0,0)" in proc.stderr, proc.stderr


def test_tsan_clean_with_barrier(binaries):
    proc = _run(binaries, "tsan_ok")
    _skip_if_tsan_unusable(proc)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ThreadSanitizer" not in proc.stderr


def test_tsan_reports_race_without_barrier(binaries):
    """Negative control: without the __syncthreads, TSan must see the shared-memory race."""
    proc = _run(binaries, "tsan_dropped_barrier")
    _skip_if_tsan_unusable(proc)
    assert "data race" in proc.stderr, proc.stderr
    assert proc.returncode != 0
