"""The static kernel report (genkernels.tools.kernel_report): it lists every instantiation with
its ptxas numbers, and it fails on a kernel that spills. Compiling needs nvcc, not a GPU."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from genkernels.tools import instantiations, kernel_report

ROOT = Path(__file__).resolve().parent.parent


def _nvcc() -> str | None:
    try:
        return kernel_report.find_nvcc()
    except kernel_report.ReportError:
        return None


needs_nvcc = pytest.mark.skipif(_nvcc() is None, reason="nvcc not found: the kernel report compiles the CUDA sources")

# Many live values under a 32-register cap (1024 threads, 2 blocks per SM): ptxas must spill.
SPILLING_KERNEL = r"""
__global__ void __launch_bounds__(1024, 2) must_spill(const float* __restrict__ x, float* __restrict__ y, int n) {
  float v[96];
#pragma unroll
  for (int i = 0; i < 96; ++i) v[i] = x[threadIdx.x + i * n];
  float acc = 0.f;
#pragma unroll
  for (int i = 0; i < 96; ++i) acc += v[i] * v[95 - i] + v[(i * 7) % 96];
#pragma unroll
  for (int i = 0; i < 96; ++i) y[threadIdx.x + i * n] = v[i] * acc;
}
"""


def _run(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "genkernels.tools.kernel_report", "--source-dir", str(ROOT), "-q", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


@needs_nvcc
def test_merge_kernels_listed_without_spills(tmp_path):
    out = tmp_path / "report.json"
    r = _run("--archs", "80", "--kernels", "merge", "--json", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads(out.read_text())
    assert not report["errors"]
    tus = {k["tu"] for k in report["kernels"]}
    expected = {row.name for row in instantiations.selected("merge")}
    assert expected and tus == expected
    for k in report["kernels"]:
        assert k["arch"] == "sm_80"
        assert k["spill_stores"] == 0 and k["spill_loads"] == 0, k
        assert 8 <= k["registers"] <= 255, k  # 255 is the hardware limit per thread
        assert k["kernel"].startswith("merge_attention_states_kernel<"), k
        assert k["kernel"] in r.stdout  # the readable name is in the printed table
    # both the 16-byte and the scalar variant of each dtype
    assert len(report["kernels"]) == 2 * len(expected)
    assert "0 spilling" in r.stdout


@needs_nvcc
def test_spilling_kernel_fails_the_report(tmp_path):
    src = tmp_path / "must_spill.cu"
    src.write_text(SPILLING_KERNEL)
    r = _run("--archs", "80", "--kernels", "bf16", "--no-sass", "--extra-source", str(src))
    assert r.returncode == kernel_report.EXIT_SPILLS, r.stdout + r.stderr
    assert "SPILL: must_spill [sm_80]" in r.stdout


def test_missing_nvcc_exits_2(tmp_path):
    r = _run("--nvcc", str(tmp_path / "no-nvcc"))
    assert r.returncode == kernel_report.EXIT_NO_TOOL
    assert "nvcc not found" in r.stderr


def test_missing_source_tree_is_a_clear_error(tmp_path):
    with pytest.raises(kernel_report.ReportError, match="csrc/ and CMakeLists.txt"):
        kernel_report.find_source_dir(str(tmp_path))


def test_parse_ptxas_and_names():
    log = """\
ptxas info    : Compiling entry function '_ZN2gk4cuda1kINS_6bf16_tELi8EEEvNS_1PE' for 'sm_80'
ptxas info    : Function properties for _ZN2gk4cuda1kINS_6bf16_tELi8EEEvNS_1PE
    16 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 64 registers, used 1 barriers, 4096 bytes smem, 552 bytes cmem[0]
"""
    (k,) = kernel_report.parse_ptxas(log, "tu", "sm_80")
    assert (k.registers, k.stack, k.spill_stores, k.spill_loads, k.smem, k.cmem, k.barriers) == (64, 16, 8, 12, 4096, 552, 1)
    assert k.spills
    assert kernel_report.shorten("void gk::cuda::k<gk::bf16_t, 8>(gk::P)") == "k<bf16_t,8>"
    assert kernel_report.parse_archs("80;90-real,sm_90a") == ["sm_80", "sm_90", "sm_90a"]


def test_parse_sass_counts():
    sass = """\
		Function : _Z1kv
        /*0010*/                   LDG.E.128 R4, [R2.64] ;
        /*0020*/              @!P0 HMMA.16816.F32.BF16 R8, R12, R16, R8 ;
        /*0030*/                   LDSM.16.M88.4 R12, [R3] ;
        /*0040*/                   LDGSTS.E.BYPASS.128 [R5], [R6.64] ;
        /*0050*/                   STG.E.128 [R2.64], R4 ;
        /*0060*/                   LDG.E R4, [R2.64] ;
"""
    assert kernel_report.parse_sass(sass) == {"_Z1kv": {"hmma": 1, "ldsm": 1, "ldgsts": 1, "ld128": 1, "st128": 1}}
