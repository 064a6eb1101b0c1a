"""Access to the native module and the plumbing every op shares: device and dtype codes,
raw pointers and strides, the caller's CUDA stream, the CPU thread count, and the switch that
routes CPU tensors through the emulated CUDA kernels (``genkernels.testing.emulate_cuda``)."""
from __future__ import annotations

import os
import threading

import torch  # imported before _C: the process then has one OpenMP runtime, torch's (see README)

from . import _C

# gk::Device and gk::DType in csrc/core/common.h
DEVICE_CPU, DEVICE_CUDA, DEVICE_EMULATED = 0, 1, 2
DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}

_state = threading.local()
_emulating_threads = 0  # threads inside emulate_cuda(): while 0, emulating() is False without the thread-local lookup
_emulating_lock = threading.Lock()
_num_threads_override: int | None = None
_poison_outputs = False  # tests: fill new outputs with NaN so an unwritten element fails


def set_poison_outputs(on: bool) -> bool:
    global _poison_outputs
    old, _poison_outputs = _poison_outputs, on
    return old


def new_output(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Allocates an op's output: uninitialised, or NaN-filled while tests poison outputs."""
    if _poison_outputs:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def emulating() -> bool:
    return getattr(_state, "emulate_cuda", False)


def set_emulating(on: bool) -> bool:
    global _emulating_threads
    old = emulating()
    if bool(on) != old:
        with _emulating_lock:
            _emulating_threads += 1 if on else -1
    _state.emulate_cuda = bool(on)
    return old


def set_num_threads(n: int | None) -> None:
    """Fixes the CPU thread count of genkernels ops; ``None`` follows ``torch.get_num_threads()``."""
    global _num_threads_override
    if n is not None and (not isinstance(n, int) or n < 1):
        raise ValueError(f"num_threads must be a positive int or None, got {n!r}")
    _num_threads_override = n


def num_threads() -> int:
    return _num_threads_override or torch.get_num_threads()


def device_code(t: torch.Tensor) -> int:
    """Where an op on `t` runs: the CUDA kernels for CUDA tensors; for CPU tensors the CPU
    kernels, or the emulated CUDA kernels inside ``emulate_cuda()``."""
    if t.is_cuda:
        return DEVICE_CUDA
    return DEVICE_EMULATED if emulating() else DEVICE_CPU


def stream_of(t: torch.Tensor) -> int:
    if t.is_cuda:
        return torch.cuda.current_stream(t.device).cuda_stream
    return 0


def ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def reload_cpu_isa() -> None:
    """Re-reads ``GK_CPU_ISA`` (tests use it to run every ISA level in one process)."""
    _C.reload_cpu_isa()


def cpu_isa_env() -> str | None:
    return os.environ.get("GK_CPU_ISA")
