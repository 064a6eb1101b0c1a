"""Flash attention forward (prefill) against ``torch.nn.functional.scaled_dot_product_attention``:
batch 1, 16 heads (and GQA 32 q / 8 kv heads), head dim 64 and 128, seqlen 512 to 4096, causal
and not, fp32 and bf16. FLOPs are 4 * Sq * Sk * d per query head (QK^T and PV), halved for causal;
the fraction of peak is of the dtype's measured GEMM peak."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ... import flash
from ..registry import Case, register

SUITE = "flash"
HEADS = [(16, 16), (32, 8)]  # (heads_q, heads_kv)
HEAD_DIMS = (64, 128)
SEQLENS = (512, 1024, 2048, 4096)
QUICK_SEQLEN = 512
DTYPES = (torch.float32, torch.bfloat16)


def _inputs(s, hq, hkv, d, dtype):
    def make(device, gen):
        q = torch.randn((1, s, hq, d), generator=gen).to(device=device, dtype=dtype)
        k = torch.randn((1, s, hkv, d), generator=gen).to(device=device, dtype=dtype)
        v = torch.randn((1, s, hkv, d), generator=gen).to(device=device, dtype=dtype)
        return q, k, v

    return make


def _ours(causal):
    return lambda q, k, v: flash.flash_attention(q, k, v, causal=causal)


def _sdpa(causal, gqa):
    """SDPA on the same (batch, seqlen, heads, head_dim) tensors, as a user of that layout calls
    it: transposed views (no copy); GQA through enable_gqa."""

    def run(q, k, v):
        return F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal, enable_gqa=gqa
        )

    return run


def flops(s: int, hq: int, d: int, causal: bool) -> int:
    full = 4 * s * s * d * hq
    return full // 2 if causal else full


for dtype in DTYPES:
    for hq, hkv in HEADS:
        for d in HEAD_DIMS:
            for causal in (False, True):
                for s in SEQLENS:
                    register(Case(
                        suite=SUITE, op="flash_attention_causal" if causal else "flash_attention",
                        shape=f"(1,{s},{hq}/{hkv},{d})", dtype=dtype, make_inputs=_inputs(s, hq, hkv, d, dtype),
                        genkernels=_ours(causal), baseline=_sdpa(causal, hq != hkv), baseline_label="torch sdpa",
                        flops=flops(s, hq, d, causal), bound="compute", size=s, quick=s == QUICK_SEQLEN,
                        tags=("attention", "prefill"),
                    ))  # fmt: skip
