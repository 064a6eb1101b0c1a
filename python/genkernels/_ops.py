"""Every torch op of genkernels: schemas, real implementations and fake (meta)
implementations, in one place. The ops work under ``torch.compile`` and pass
``torch.library.opcheck``; the public functions in the op modules call them through
``torch.ops.genkernels``.

Ops are registered with ``torch.library.Library`` rather than the ``custom_op`` decorator: the
decorator wraps every call in an autograd.Function and costs about 7 µs per call, the plain
registration about 2 µs (measured on this project's 2-core CI machine), which matters for ops
called once per layer per token. The kernels are forward-only (inference): the Autograd key
falls through, so outputs never require grad, and a mutated argument is declared in the schema
with ``(a!)``.
"""
from __future__ import annotations

from typing import Callable

import torch

from . import merge as _merge

_lib = torch.library.Library("genkernels", "DEF")


def define(schema: str, impl: Callable, fake: Callable) -> None:
    """Defines ``genkernels::<schema>`` with `impl` for CPU and CUDA tensors and `fake` for
    fake/meta tensors (shape inference under torch.compile)."""
    name = schema.split("(", 1)[0]
    _lib.define(schema)
    _lib.impl(name, impl, "CPU")
    _lib.impl(name, impl, "CUDA")
    _lib.impl(name, torch.library.fallthrough_kernel, "Autograd")
    torch.library.register_fake(f"genkernels::{name}", fake, lib=_lib)


define(
    "merge_attention_states(Tensor out_a, Tensor lse_a, Tensor out_b, Tensor lse_b) -> (Tensor, Tensor)",
    _merge.merge_pair_impl,
    _merge.merge_pair_fake,
)
define(
    "merge_attention_states_n(Tensor outs, Tensor lses) -> (Tensor, Tensor)",
    _merge.merge_stacked_impl,
    _merge.merge_stacked_fake,
)
