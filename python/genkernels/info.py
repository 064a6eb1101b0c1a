"""Runtime information: ``genkernels.info()`` and ``python -m genkernels info``."""
from __future__ import annotations

import torch

from . import _native


def info() -> dict:
    """Version, CUDA archs compiled (or "built without CUDA"), whether a usable GPU is present
    and if not why, the CPU ISA level in use, and the CPU thread count."""
    b = _native._C.build_info()
    count, why = _native._C.cuda_device_count()
    return {
        "version": b["version"],
        "cuda_kernels": b["cuda_archs"] if b["with_cuda"] else "built without CUDA",
        "cuda_devices": count,
        "cuda_unavailable_reason": "" if count > 0 else why,
        "cuda_emulation": b["with_emulation"],
        "cpu_isa": b["cpu_isa"],
        "cpu_isa_detected": b["cpu_isa_detected"],
        "cpu_isas_compiled": b["cpu_isas_compiled"],
        "cpu_threads": _native.num_threads(),
        "torch": torch.__version__,
    }


def format_info(d: dict | None = None) -> str:
    d = info() if d is None else d
    width = max(len(k) for k in d)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in d.items())
