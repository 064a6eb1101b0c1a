"""Shared builders for the decode-attention tests: random caches, contiguous or paged, holding the
same logical contents, so the two layouts can be compared with each other and the reference."""
from __future__ import annotations

import torch


def make_cache(batch, capacity, heads_kv, head_dim, dtype, page_size=0, generator=None):
    """Returns ``(k_cache, v_cache, block_table)`` (block_table None for page_size 0). Paged caches
    get shuffled pages plus spare ones, so a wrong page lookup reads the wrong data."""
    if not page_size:
        k = torch.randn(batch, capacity, heads_kv, head_dim, dtype=dtype, generator=generator)
        return k, torch.randn_like(k), None
    max_pages = -(-capacity // page_size)
    num_pages = batch * max_pages + 3
    k = torch.randn(num_pages, page_size, heads_kv, head_dim, dtype=dtype, generator=generator)
    table = torch.randperm(num_pages, generator=generator)[: batch * max_pages].view(batch, max_pages).to(torch.int32)
    return k, torch.randn_like(k), table


def to_contiguous(cache, block_table, capacity):
    """The logical contents of a paged cache as a contiguous ``(batch, capacity, H, D)`` cache."""
    batch = block_table.shape[0]
    page_size = cache.shape[1]
    t = torch.arange(capacity)
    return torch.stack([cache[block_table[b].long()[t // page_size], t % page_size] for b in range(batch)])
