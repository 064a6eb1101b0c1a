"""genkernels: CUDA kernels with C++ CPU fallbacks for generative models.

Ops take and return PyTorch tensors; CUDA tensors run the CUDA kernels, CPU tensors the CPU
kernels (or, inside ``genkernels.testing.emulate_cuda()``, the CUDA kernels on the CPU
emulator). Every op is a ``torch.library`` custom op (``torch.ops.genkernels.*``).
"""
from __future__ import annotations

import torch  # noqa: F401  (first: see _native)

from . import _ops  # noqa: F401  (registers torch.ops.genkernels.*)
from . import diffusion  # noqa: F401  (genkernels.diffusion.*_step)
from ._native import set_num_threads
from .info import info
from .merge import merge_attention_states, merge_attention_states_n
from .flash import flash_attention, flash_attention_varlen
from .decode import decode_attention
from .kv_cache import PagedKVCache, append_kv_cache, apply_rotary

__version__ = "0.1.0"

__all__ = [
    "PagedKVCache",
    "append_kv_cache",
    "apply_rotary",
    "decode_attention",
    "flash_attention",
    "flash_attention_varlen",
    "info",
    "merge_attention_states",
    "merge_attention_states_n",
    "set_num_threads",
]
