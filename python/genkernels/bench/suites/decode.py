"""KV-cache decode attention (issue 4): 32 query heads over 8 kv heads, head dim 128, one new
token per sequence, cache lengths 1k-64k, batch 1 and 8, fp32 and bf16, contiguous and paged
(page 16) caches. Baselines: ``scaled_dot_product_attention`` with ``enable_gqa=True``, and the
faster PyTorch formulation that folds a group's query heads into the query axis. GB/s counts
the cache read (K and V once), which dominates the traffic. The ``decode_attention_overhead``
cases (a one-token cache, warm) measure the per-call cost: wrapper, binding, output allocation.

Against the folded baseline, each case also times, in the same loop (batch for batch, so both
see the same machine state), ``torch.sum`` over the same cache bytes: the "% of torch.sum" is the
fraction of this machine's read bandwidth the kernel reaches. Paged cases also time the kernel
on the contiguous copy of the same logical cache ("x contiguous": paged time over contiguous)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ... import decode
from ..registry import Case, Companion, register

SUITE = "decode"
HEADS_Q, HEADS_KV, HEAD_DIM, PAGE = 32, 8, 128, 16
LENGTHS = (1024, 4096, 16384, 65536)
BATCHES = (1, 8)
DTYPES = (torch.float32, torch.bfloat16)
QUICK = {(1, 1024)}


def _inputs(batch, length, dtype, paged):
    def make(device, gen):
        k = torch.randn((batch, length, HEADS_KV, HEAD_DIM), generator=gen).to(device=device, dtype=dtype)
        v = torch.randn((batch, length, HEADS_KV, HEAD_DIM), generator=gen).to(device=device, dtype=dtype)
        q = torch.randn((batch, 1, HEADS_Q, HEAD_DIM), generator=gen).to(device=device, dtype=dtype)
        lens = torch.full((batch,), length, dtype=torch.int32, device=device)
        table = None
        if paged:  # the same logical cache scattered over shuffled pages
            pages = batch * length // PAGE
            table = torch.randperm(pages, generator=gen).to(device=device, dtype=torch.int32).view(batch, -1)
            kp = torch.empty((pages, PAGE, HEADS_KV, HEAD_DIM), dtype=dtype, device=device)
            vp = torch.empty_like(kp)
            kp[table.view(-1).long()] = k.view(pages, PAGE, HEADS_KV, HEAD_DIM)
            vp[table.view(-1).long()] = v.view(pages, PAGE, HEADS_KV, HEAD_DIM)
            return q, kp, vp, lens, table, k, v
        return q, k, v, lens, table, k, v

    return make


def _genkernels(q, k_cache, v_cache, lens, table, k, v):
    return decode.decode_attention(q, k_cache, v_cache, lens, block_table=table)


def read_probe(q, k_cache, v_cache, lens, table, k, v):
    """``torch.sum`` over the cache the kernel reads (the pool, when paged), viewed as fp32 so that
    every dtype is read at the same speed: this machine's read bandwidth on the same bytes."""
    return torch.sum(k_cache.view(-1).view(torch.float32)), torch.sum(v_cache.view(-1).view(torch.float32))


def contiguous(q, k_cache, v_cache, lens, table, k, v):
    """The kernel on the contiguous copy of a paged case's logical cache."""
    return decode.decode_attention(q, k, v, lens)


def sdpa_gqa(q, k_cache, v_cache, lens, table, k, v):
    """PyTorch's GQA attention over the logical (contiguous) cache."""
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), enable_gqa=True)


def sdpa_folded(q, k_cache, v_cache, lens, table, k, v):
    """The group's query heads folded into the query axis: one (group x D) @ (D x L) per kv head."""
    b, _, hq, d = q.shape
    return F.scaled_dot_product_attention(q.view(b, HEADS_KV, hq // HEADS_KV, d), k.transpose(1, 2), v.transpose(1, 2))


for dtype in DTYPES:
    for batch in BATCHES:
        for length in LENGTHS:
            for paged in (False, True):
                cache_bytes = 2 * batch * length * HEADS_KV * HEAD_DIM * (torch.finfo(dtype).bits // 8)
                shape = f"({batch},1,{HEADS_Q},{HEAD_DIM}) kv{HEADS_KV}x{length}" + (f" page{PAGE}" if paged else "")
                if batch * length > 8 * 16384:
                    continue  # 8 x 64k: 4-8 GiB per input set, beyond this machine's memory with rotation
                refs = (Companion("torch.sum", read_probe, "rate"),
                        *((Companion("contiguous", contiguous, "time"),) if paged else ()))
                for op, label, baseline, companions in (("decode_attention", "torch folded", sdpa_folded, refs),
                                                        ("decode_attention_vs_sdpa_gqa", "sdpa enable_gqa", sdpa_gqa, ())):
                    register(Case(
                        suite=SUITE, op=op, shape=shape, dtype=dtype,
                        make_inputs=_inputs(batch, length, dtype, paged), genkernels=_genkernels, baseline=baseline,
                        baseline_label=label, bytes_moved=cache_bytes, flops=4 * batch * HEADS_Q * length * HEAD_DIM,
                        bound="memory", size=length, quick=(batch, length) in QUICK and not paged,
                        tags=("decode_attention",), companions=companions, read_bytes=cache_bytes,
                    ))  # fmt: skip

# Per-call overhead: one token against a one-token cache (the kernel does almost nothing), warm,
# batch 1; the wrapper, binding and output allocation against PyTorch's folded call.
for dtype in DTYPES:
    register(Case(
        suite=SUITE, op="decode_attention_overhead", shape=f"(1,1,{HEADS_Q},{HEAD_DIM}) kv{HEADS_KV}x1", dtype=dtype,
        make_inputs=_inputs(1, 1, dtype, False), genkernels=_genkernels, baseline=sdpa_folded,
        baseline_label="torch folded", size=1, quick=True, cold=False, tags=("decode_attention", "overhead"),
    ))  # fmt: skip
