"""Merge of partial attention states: the pair op and N = 8 stacked partials (split-KV decode),
from one decode token to a 4096-token prefill, in fp32 and bf16; plus the per-call overhead of
the op against ``torch.add`` of two tiny tensors."""
from __future__ import annotations

import torch

from ... import merge
from ...reference import merge_attention_states_torch
from ..registry import Case, register

SUITE = "merge"
HEADS, HEAD_DIM = 32, 128
# (batch, seqlen): a decode token, a decode batch, and prefill-sized rows for the scaling plot
SHAPES = [(1, 1), (8, 1), (1, 256), (4, 1024), (1, 4096)]
QUICK = {(1, 1), (8, 1), (1, 256)}
STACKED_N = 8
DTYPES = (torch.float32, torch.bfloat16)


def merge_pair_torch(out_a, lse_a, out_b, lse_b):
    """The pair merge as a PyTorch user writes it: logaddexp, weights, a weighted sum in fp32."""
    lse = torch.logaddexp(lse_a, lse_b)
    w_a = torch.exp(lse_a - lse).transpose(1, 2).unsqueeze(-1)
    w_b = torch.exp(lse_b - lse).transpose(1, 2).unsqueeze(-1)
    out = (w_a * out_a.float() + w_b * out_b.float()).to(out_a.dtype)
    return out, lse


def _stacked_inputs(n, b, s, dtype):
    def make(device, gen):
        outs = torch.randn((n, b, s, HEADS, HEAD_DIM), generator=gen).to(device=device, dtype=dtype)
        lses = (4 * torch.randn((n, b, HEADS, s), generator=gen)).to(device)
        return outs, lses

    return make


def _pair_inputs(b, s, dtype):
    stacked = _stacked_inputs(2, b, s, dtype)

    def make(device, gen):
        outs, lses = stacked(device, gen)
        return outs[0].clone(), lses[0].clone(), outs[1].clone(), lses[1].clone()

    return make


def bytes_moved(n: int, b: int, s: int, dtype: torch.dtype) -> int:
    """Compulsory traffic: N partial outputs and LSEs read, one output and LSE written."""
    rows = b * s * HEADS
    elem = torch.finfo(dtype).bits // 8
    return (n + 1) * rows * HEAD_DIM * elem + (n + 1) * rows * 4


def _shape(n, b, s) -> str:
    return f"{n}x({b},{s},{HEADS},{HEAD_DIM})"


for dtype in DTYPES:
    for b, s in SHAPES:
        common = dict(suite=SUITE, dtype=dtype, bound="memory", size=b * s, quick=(b, s) in QUICK)
        register(Case(
            op="merge_attention_states", shape=_shape(2, b, s), make_inputs=_pair_inputs(b, s, dtype),
            genkernels=merge.merge_attention_states, baseline=merge_pair_torch,
            bytes_moved=bytes_moved(2, b, s, dtype), flops=2 * 2 * b * s * HEADS * HEAD_DIM, **common,
        ))  # fmt: skip
        register(Case(
            op="merge_attention_states_n", shape=_shape(STACKED_N, b, s),
            make_inputs=_stacked_inputs(STACKED_N, b, s, dtype),
            genkernels=merge.merge_attention_states_n, baseline=merge_attention_states_torch,
            bytes_moved=bytes_moved(STACKED_N, b, s, dtype), flops=2 * STACKED_N * b * s * HEADS * HEAD_DIM, **common,
        ))  # fmt: skip


# ------------------------------------------------------------------ per-call overhead
TINY = 8  # elements of each torch.add operand


def _overhead_inputs(device, gen):
    pair = _pair_inputs(1, 1, torch.float32)(device, gen)
    x, y = torch.randn(TINY, generator=gen).to(device), torch.randn(TINY, generator=gen).to(device)
    return (*pair, x, y)


def _tiny_add(out_a, lse_a, out_b, lse_b, x, y):
    return torch.add(x, y)


_overhead_variants = [("call_overhead", lambda oa, la, ob, lb, x, y: merge.merge_attention_states(oa, la, ob, lb))]
if hasattr(merge, "merge_pair_impl"):  # the same op without the torch.library dispatcher
    _overhead_variants.append(("call_overhead_no_dispatch", lambda oa, la, ob, lb, x, y: merge.merge_pair_impl(oa, la, ob, lb)))

for _op, _fn in _overhead_variants:
    register(Case(
        suite=SUITE, op=_op, shape=_shape(2, 1, 1), dtype=torch.float32, make_inputs=_overhead_inputs,
        genkernels=_fn, baseline=_tiny_add, baseline_label=f"torch.add ({TINY},)", size=1, quick=True,
        cold=False, tags=("overhead",),
        note=f"wrapper + launch cost: genkernels on the smallest shape vs torch.add of two ({TINY},) tensors",
    ))  # fmt: skip
