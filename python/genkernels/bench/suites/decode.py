"""KV-cache decode attention (issue 4): 32 query heads over 8 kv heads, head dim 128, one new
token per sequence, cache lengths 1k-64k, batch 1 and 8, fp32 and bf16, contiguous and paged
(page 16) caches. Baselines: ``scaled_dot_product_attention`` with ``enable_gqa=True``, and the
faster PyTorch formulation that folds a group's query heads into the query axis. GB/s counts
the cache read (K and V once), which dominates the traffic. The ``decode_attention_overhead``
cases (a one-token cache, warm) measure the per-call cost: wrapper, binding, output allocation.

Against the folded baseline, each case also times, in the same loop (batch for batch, so both
see the same machine state), ``torch.sum`` over the same cache bytes: the "% of torch.sum" is the
fraction of this machine's read bandwidth the kernel reaches. Paged cases also time the kernel
on the contiguous copy of the same logical cache ("x contiguous": paged time over contiguous).

The cache writes of the same models: ``append_kv_cache`` with fused RoPE (a decode step of 8
sequences, warm, and a 4096-token prefill; contiguous and paged) and ``apply_rotary`` of the
queries, each against the same computation in PyTorch. (A prefill's ``apply_rotary`` returns a
new 64 MiB tensor in fp32: on the CPU its time is mostly the first touch of that memory, which
the PyTorch baseline pays as well.)"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ... import decode, kv_cache
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


def sum_as_fp32(*caches):
    """``torch.sum`` over each cache's bytes viewed as fp32, so that every dtype is read at the
    same speed: the machine's read bandwidth on the bytes a kernel reads (the suites' probe)."""
    return tuple(torch.sum(c.view(-1).view(torch.float32)) for c in caches)


def read_probe(q, k_cache, v_cache, lens, table, k, v):
    """``torch.sum`` over the cache the kernel reads (the pool, when paged)."""
    return sum_as_fp32(k_cache, v_cache)


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


# ------------------------------------------------------------------ append_kv_cache, apply_rotary
# The writes of a decode step and of a prefill: new keys (rotated, fused RoPE over all 128 dims,
# GPT-NeoX layout) and values into the cache at each sequence's length, and the queries' RoPE.
# Baselines: the same in PyTorch (rotation in fp32 as the kernels do, then an indexed write
# into the cache). A call resets cache_seqlens first (a copy of 8 ints, in both), so that the
# cache never fills. Rates count the new keys and values read and written (tables aside).
ROPE_POSITIONS = 4096


def _rope_tables(gen):
    inv = 1.0 / (10000 ** (torch.arange(0, HEAD_DIM, 2, dtype=torch.float64) / HEAD_DIM))
    ang = torch.arange(ROPE_POSITIONS, dtype=torch.float64)[:, None] * inv[None]
    return ang.cos().float(), ang.sin().float()


def rope_torch(x, cos, sin, positions):
    """RoPE of x (batch, seqlen, heads, head_dim) at int64 positions (batch, seqlen), non-interleaved,
    as a PyTorch user writes it: fp32 math, one rounding to x's dtype."""
    c, s = cos[positions].unsqueeze(2), sin[positions].unsqueeze(2)
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)


def _append_inputs(batch, seqlen_new, capacity, dtype, paged):
    def make(device, gen):
        kv_shape = (batch, seqlen_new, HEADS_KV, HEAD_DIM)
        k_new = torch.randn(kv_shape, generator=gen).to(device=device, dtype=dtype)
        v_new = torch.randn(kv_shape, generator=gen).to(device=device, dtype=dtype)
        lens0 = torch.randint(0, capacity - seqlen_new + 1, (batch,), generator=gen, dtype=torch.int32).to(device)
        cos, sin = (t.to(device) for t in _rope_tables(gen))
        table = None
        if paged:
            pages = batch * capacity // PAGE
            table = torch.randperm(pages, generator=gen).to(device=device, dtype=torch.int32).view(batch, -1)
            k_cache = torch.zeros((pages, PAGE, HEADS_KV, HEAD_DIM), dtype=dtype, device=device)
        else:
            k_cache = torch.zeros((batch, capacity, HEADS_KV, HEAD_DIM), dtype=dtype, device=device)
        return k_new, v_new, k_cache, torch.zeros_like(k_cache), lens0.clone(), lens0, table, cos, sin

    return make


def _append_genkernels(k_new, v_new, k_cache, v_cache, lens, lens0, table, cos, sin):
    lens.copy_(lens0)
    kv_cache.append_kv_cache(k_new, v_new, k_cache, v_cache, lens, block_table=table, rotary_cos=cos, rotary_sin=sin)


def append_torch(k_new, v_new, k_cache, v_cache, lens, lens0, table, cos, sin):
    """Rotate the new keys, then write keys and values at each sequence's slots with advanced
    indexing (through the block table when paged), then advance the lengths."""
    lens.copy_(lens0)
    batch, seqlen_new = k_new.shape[:2]
    pos = lens.long()[:, None] + torch.arange(seqlen_new, device=lens.device)
    k_rot = rope_torch(k_new, cos, sin, pos)
    if table is None:
        rows = torch.arange(batch, device=lens.device)[:, None].expand(batch, seqlen_new)
        k_cache[rows, pos] = k_rot
        v_cache[rows, pos] = v_new
    else:
        page = table.gather(1, pos // PAGE).long()
        slot = pos % PAGE
        k_cache[page, slot] = k_rot
        v_cache[page, slot] = v_new
    lens += seqlen_new


def _rotary_inputs(batch, seqlen, dtype):
    def make(device, gen):
        q = torch.randn((batch, seqlen, HEADS_Q, HEAD_DIM), generator=gen).to(device=device, dtype=dtype)
        start = torch.randint(0, ROPE_POSITIONS - seqlen + 1, (batch,), generator=gen, dtype=torch.int32).to(device)
        cos, sin = (t.to(device) for t in _rope_tables(gen))
        return q, cos, sin, start

    return make


def _rotary_genkernels(q, cos, sin, start):
    return kv_cache.apply_rotary(q, cos, sin, start)


def rotary_torch(q, cos, sin, start):
    pos = start.long()[:, None] + torch.arange(q.shape[1], device=q.device)
    return rope_torch(q, cos, sin, pos)


# (batch, seqlen_new, capacity): a decode step of 8 sequences (warm: the per-call cost), a prefill
for dtype in DTYPES:
    for batch, seqlen_new, capacity in ((8, 1, 1024), (1, 4096, 4096)):
        step = seqlen_new == 1
        new_bytes = 2 * batch * seqlen_new * HEADS_KV * HEAD_DIM * (torch.finfo(dtype).bits // 8)
        for paged in (False, True):
            register(Case(
                suite=SUITE, op="append_kv_cache",
                shape=f"({batch},{seqlen_new},{HEADS_KV},{HEAD_DIM}) cap{capacity}" + (f" page{PAGE}" if paged else ""),
                dtype=dtype, make_inputs=_append_inputs(batch, seqlen_new, capacity, dtype, paged),
                genkernels=_append_genkernels, baseline=append_torch, baseline_label="torch index_put",
                bytes_moved=2 * new_bytes, size=batch * seqlen_new, quick=step, cold=not step,
                tags=("append_kv_cache",) + (("overhead",) if step else ()),
            ))  # fmt: skip
        q_bytes = batch * seqlen_new * HEADS_Q * HEAD_DIM * (torch.finfo(dtype).bits // 8)
        register(Case(
            suite=SUITE, op="apply_rotary", shape=f"({batch},{seqlen_new},{HEADS_Q},{HEAD_DIM})", dtype=dtype,
            make_inputs=_rotary_inputs(batch, seqlen_new, dtype), genkernels=_rotary_genkernels, baseline=rotary_torch,
            baseline_label="torch", bytes_moved=2 * q_bytes, size=batch * seqlen_new, quick=step, cold=not step,
            tags=("apply_rotary",) + (("overhead",) if step else ()),
        ))  # fmt: skip
