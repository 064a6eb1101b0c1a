"""``python -m genkernels.bench``: the merge suite in --quick mode writes a JSON row per case
(with machine info and measured peaks) and a PNG; --list lists without running."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from genkernels.bench import registry

pytest.importorskip("matplotlib")


def _bench(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "genkernels.bench", *args], capture_output=True, text=True, timeout=timeout)


def test_quick_merge_json_and_plot(tmp_path):
    out_json, out_png = tmp_path / "bench.json", tmp_path / "bench.png"
    r = _bench("merge", "--quick", "--repeats", "2", "--threads", "1", "--json", str(out_json), "--plot", str(out_png))
    assert r.returncode == 0, r.stdout + r.stderr
    doc = json.loads(out_json.read_text())
    expected = [c.name for c in registry.select(["merge"], quick=True)]
    assert [row["name"] for row in doc["rows"]] == expected
    assert any(row["op"] == "call_overhead" for row in doc["rows"])
    for row in doc["rows"]:
        assert row["genkernels_us"] > 0 and row["baseline_us"] > 0, row
        pairs = sorted(b / o for b, o in zip(row["baseline_samples_us"], row["genkernels_samples_us"]))
        assert row["speedup"] == pytest.approx((pairs[0] + pairs[1]) / 2)  # the median of per-repeat ratios
        if row["bytes_moved"]:
            assert row["rate_unit"] == "GB/s" and row["rate"] > 0 and row["fraction_of_peak"] > 0
    assert doc["peaks"]["copy_gbps"] > 0 and doc["peaks"]["gemm_fp32_gflops"] > 0
    assert doc["machine"]["version"] and doc["device"] in ("cpu", "cuda")
    assert out_png.stat().st_size > 1000 and out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "merge_attention_states_n" in r.stdout and "speedup" in r.stdout
    assert "[1/" in r.stderr  # progress goes to stderr, without a TTY


def test_list_and_unknown_name():
    r = _bench("--list")
    assert r.returncode == 0, r.stderr
    assert "merge_attention_states/2x(1,1,32,128)/fp32" in r.stdout
    bad = _bench("no_such_suite", "--list")
    assert bad.returncode == 2 and "no benchmark case matches 'no_such_suite'" in bad.stderr
    for flag, value in (("--repeats", "0"), ("--repeats", "-3"), ("--threads", "0")):
        bad = _bench("merge", flag, value)  # rejected before anything is measured
        assert bad.returncode == 2 and f"{flag} must be at least 1" in bad.stderr, (flag, value, bad.stderr)
