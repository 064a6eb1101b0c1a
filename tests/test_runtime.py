"""Runtime information, CPU ISA selection and the OpenMP runtime choice."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import genkernels as gk
from genkernels import _native


def test_info_fields():
    info = gk.info()
    assert info["version"] == gk.__version__
    assert info["cpu_isa"] in info["cpu_isas_compiled"].split(",")
    assert info["cpu_threads"] == torch.get_num_threads()
    if info["cuda_devices"] == 0:
        assert info["cuda_unavailable_reason"], "no GPU must come with a reason"


def test_info_cli():
    out = subprocess.run([sys.executable, "-m", "genkernels", "info"], capture_output=True, text=True, check=True).stdout
    assert "cpu_isa" in out and "cuda_kernels" in out


def test_one_openmp_runtime_in_the_process():
    """genkernels links OpenMP and imports torch first, so the process holds a single libgomp
    (torch's): one thread pool, no oversubscription between torch ops and ours."""
    with open("/proc/self/maps") as f:
        gomps = {line.split()[-1] for line in f if "libgomp" in line}
    assert len(gomps) <= 1, gomps


def test_thread_count_follows_torch():
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert _native.num_threads() == 1
        gk.set_num_threads(2)
        assert _native.num_threads() == 2
    finally:
        gk.set_num_threads(None)
        torch.set_num_threads(old)
    with pytest.raises(ValueError, match="num_threads"):
        gk.set_num_threads(0)


def test_forced_isa_levels(monkeypatch):
    for isa in gk.info()["cpu_isas_compiled"].split(","):
        monkeypatch.setenv("GK_CPU_ISA", isa)
        try:
            _native.reload_cpu_isa()
        except ValueError:
            continue  # compiled but not supported by this CPU
        assert gk.info()["cpu_isa"] == isa
    monkeypatch.setenv("GK_CPU_ISA", "sse9")
    with pytest.raises(ValueError, match="GK_CPU_ISA"):
        _native.reload_cpu_isa()
    monkeypatch.delenv("GK_CPU_ISA")
    _native.reload_cpu_isa()
    assert gk.info()["cpu_isa"] == gk.info()["cpu_isa_detected"]


def test_emulate_cuda_is_thread_local_and_restored():
    from genkernels import testing

    if not testing.has_emulation():
        pytest.skip("built without CUDA emulation")
    x = torch.randn(1, 1, 1, 8)
    assert _native.device_code(x) == _native.DEVICE_CPU
    with testing.emulate_cuda():
        assert _native.device_code(x) == _native.DEVICE_EMULATED
    assert _native.device_code(x) == _native.DEVICE_CPU
