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
from . import flash as _flash
from .diffusion import _fused as _diffusion
from . import decode as _decode
from . import kv_cache as _kv_cache

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
define(
    "merge_attention_states_out(Tensor out_a, Tensor lse_a, Tensor out_b, Tensor lse_b, Tensor(a!) out, Tensor(b!) lse_out) -> ()",
    _merge.merge_pair_out_impl,
    _merge.merge_pair_out_fake,
)
define(
    "merge_attention_states_n_out(Tensor outs, Tensor lses, Tensor(a!) out, Tensor(b!) lse_out) -> ()",
    _merge.merge_stacked_out_impl,
    _merge.merge_stacked_out_fake,
)
define(
    "diffusion_step(Tensor model_output, Tensor sample, float[] coeffs, float? guidance_scale, Tensor? history, "
    "Tensor? noise, int seed, int offset, bool return_x0, float guidance_rescale=0., float threshold_ratio=0., "
    "float threshold_max=1.) -> (Tensor, Tensor)",
    _diffusion.step_impl,
    _diffusion.step_fake,
)
define(
    "diffusion_step_out(Tensor model_output, Tensor sample, float[] coeffs, float? guidance_scale, Tensor? history, "
    "Tensor? noise, int seed, int offset, Tensor(a!) out, Tensor(b!)? x0_out, float guidance_rescale=0., "
    "float threshold_ratio=0., float threshold_max=1.) -> ()",
    _diffusion.step_out_impl,
    _diffusion.step_out_fake,
)
define("gaussian_noise_(Tensor(a!) out, int seed, int offset) -> ()", _diffusion.gaussian_noise_impl, _diffusion.gaussian_noise_fake)
define(
    "decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor cache_seqlens, Tensor? block_table, bool causal, "
    "int window_left, int window_right, float softmax_scale, float softcap, Tensor? alibi_slopes, int num_splits) "
    "-> (Tensor, Tensor)",
    _decode.decode_impl,
    _decode.decode_fake,
)
define(
    "append_kv_cache(Tensor k_new, Tensor v_new, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor(c!) cache_seqlens, "
    "Tensor? block_table, Tensor? rotary_cos, Tensor? rotary_sin, bool rotary_interleaved) -> ()",
    _kv_cache.append_impl,
    _kv_cache.append_fake,
)
define(
    "apply_rotary(Tensor x, Tensor cos, Tensor sin, Tensor positions, bool interleaved) -> Tensor",
    _kv_cache.rotary_impl,
    _kv_cache.rotary_fake,
)
define(
    "flash_attention(Tensor q, Tensor k, Tensor v, bool causal, int window_left, int window_right, "
    "float softmax_scale, float softcap, Tensor? alibi_slopes, bool return_lse) -> (Tensor, Tensor)",
    _flash.dense_impl,
    _flash.dense_fake,
)
define(
    "flash_attention_varlen(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, int max_seqlen_q, "
    "int max_seqlen_k, bool causal, int window_left, int window_right, float softmax_scale, float softcap, "
    "Tensor? alibi_slopes, bool return_lse) -> (Tensor, Tensor)",
    _flash.varlen_impl,
    _flash.varlen_fake,
)
