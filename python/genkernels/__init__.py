"""genkernels: CUDA kernels with C++ CPU fallbacks for generative models.

Ops take and return PyTorch tensors; CUDA tensors run the CUDA kernels, CPU tensors the CPU
kernels (or, inside ``genkernels.testing.emulate_cuda()``, the CUDA kernels on the CPU
emulator). Every op is a ``torch.library`` custom op (``torch.ops.genkernels.*``).
"""
from __future__ import annotations

import torch  # noqa: F401  (first: see _native)

from . import _ops  # noqa: F401  (registers torch.ops.genkernels.*)
from ._native import set_num_threads
from .info import info
from .merge import merge_attention_states, merge_attention_states_n

__version__ = "0.1.0"

__all__ = [
    "info",
    "merge_attention_states",
    "merge_attention_states_n",
    "set_num_threads",
]
