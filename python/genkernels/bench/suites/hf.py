"""Attention inside Hugging Face ``transformers`` models: ``attn_implementation="genkernels"``
(``genkernels.integrations.transformers``) against ``transformers``' own SDPA attention function,
called as a decoder layer calls it during a decoding step, on the tensors a ``DynamicCache``
holds: ``(batch, heads_kv, length, head_dim)``, 32 query heads over 8 kv heads, head dim 128.

- Unpadded batches: the decode kernel reads those tensors in place. The "% of torch.sum" is the
  read rate against ``torch.sum`` over the same cache, timed in the same loop. ``transformers``
  passes no mask here, and its SDPA function then calls SDPA with ``enable_gqa=True``.
- With a mask (the padded cases, and every step of a static cache) it folds a group's query
  heads into the query axis instead, the faster form.
- Left-padded batches (4 sequences with 0, 1/8, 1/4 and 1/2 of the length padded): one-token
  pages over the same memory. SDPA gets the boolean ``(batch, 1, 1, length)`` mask that
  ``transformers`` builds for it. GB/s counts the valid tokens' keys and values.

The suite registers nothing when ``transformers`` is not installed."""
from __future__ import annotations

import torch

from ..registry import Case, Companion, register
from .decode import sum_as_fp32

SUITE = "hf"
HEADS_Q, HEADS_KV, HEAD_DIM = 32, 8, 128
# (batch, length, left-padded)
SHAPES = ((1, 4096, False), (1, 16384, False), (4, 4096, False), (4, 4096, True))

try:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from ...integrations import transformers as gkt
except ImportError:  # transformers is optional
    gkt = None


class _Layer(torch.nn.Module):
    """What the attention functions read from the calling attention module."""

    is_causal = True
    num_key_value_groups = HEADS_Q // HEADS_KV


def _pads(batch: int, length: int) -> list[int]:
    return [0, length // 8, length // 4, length // 2][:batch]


def _inputs(batch, length, dtype, padded):
    def make(device, gen):
        def rand(*shape):
            return torch.randn(shape, generator=gen).to(device=device, dtype=dtype)

        q = rand(batch, HEADS_Q, 1, HEAD_DIM)
        k, v = rand(batch, HEADS_KV, length, HEAD_DIM), rand(batch, HEADS_KV, length, HEAD_DIM)
        mask2d = mask4d = None
        if padded:
            mask2d = torch.ones((batch, length), dtype=torch.bool, device=device)
            for b, n in enumerate(_pads(batch, length)):
                mask2d[b, :n] = False
            mask4d = mask2d[:, None, None, :]
        return _Layer().eval(), q, k, v, mask2d, mask4d

    return make


def _genkernels(layer, q, k, v, mask2d, mask4d):
    return gkt.attention_forward(layer, q, k, v, mask2d, scaling=HEAD_DIM**-0.5)[0]


def sdpa(layer, q, k, v, mask2d, mask4d):
    """transformers' SDPA attention function (GQA through ``enable_gqa`` or ``repeat_kv``, as it
    chooses for this torch version)."""
    return sdpa_attention_forward(layer, q, k, v, mask4d, scaling=HEAD_DIM**-0.5)[0]


def read_probe(layer, q, k, v, mask2d, mask4d):
    """``torch.sum`` over the cache tensors, as the decode suite's probe."""
    return sum_as_fp32(k, v)


if gkt is not None:
    for dtype in (torch.float32, torch.bfloat16):
        for batch, length, padded in SHAPES:
            tokens = batch * length - (sum(_pads(batch, length)) if padded else 0)
            read = 2 * tokens * HEADS_KV * HEAD_DIM * (torch.finfo(dtype).bits // 8)
            register(Case(
                suite=SUITE, op="hf_decode_attention",
                shape=f"({batch},{HEADS_Q},1,{HEAD_DIM}) kv{HEADS_KV}x{length}" + (" left-padded" if padded else ""),
                dtype=dtype, make_inputs=_inputs(batch, length, dtype, padded), genkernels=_genkernels, baseline=sdpa,
                baseline_label="transformers sdpa", bytes_moved=read, read_bytes=read, bound="memory", size=length,
                quick=(batch, length, padded) == (1, 4096, False), tags=("decode_attention", "transformers"),
                companions=() if padded else (Companion("torch.sum", read_probe, "rate"),),
            ))  # fmt: skip
