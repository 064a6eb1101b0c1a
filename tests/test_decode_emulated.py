"""The CUDA decode-attention kernels (csrc/cuda/decode_attention.cuh) run through the CUDA-on-CPU
emulator on small shapes, against the float64 reference: every path (contiguous/paged, page
sizes 1/16/64, splits 1 and > 1, GQA groups 1/4/8, seqlen_q 1 and 4, each head dim)."""
from __future__ import annotations

import pytest
import torch

import genkernels as gk
from genkernels import reference as ref
from genkernels.testing import assert_close, emulate_cuda, has_emulation
from genkernels.tools.instantiations import DECODE_HEAD_DIMS

from decode_cases import make_cache

pytestmark = [pytest.mark.emulated, pytest.mark.skipif(not has_emulation(), reason="built without emulation")]


def check(q, k, v, lens, table=None, **kw):
    with emulate_cuda():
        out, lse = gk.decode_attention(q, k, v, lens, block_table=table, return_lse=True, **kw)
    kw.pop("num_splits", None)
    want, want_lse = ref.decode_attention(q, k, v, lens, block_table=table, **kw)
    base, base_lse = ref.decode_attention(q, k, v, lens, block_table=table, dtype=q.dtype, **kw)
    assert_close("out", out, want, base)
    assert_close("lse", lse, want_lse, base_lse.float() if q.dtype != torch.float32 else None)


@pytest.mark.parametrize("page_size", [0, 1, 16, 64])
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("seqlen_q", [1, 4])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_paths(page_size, group, seqlen_q, num_splits):
    g = torch.Generator().manual_seed(page_size * 100 + group * 10 + seqlen_q + num_splits)
    dtype = torch.bfloat16 if group != 4 else torch.float16
    k, v, table = make_cache(2, 70, 1, 64, dtype, page_size, g)
    ps = page_size or 16
    lens = torch.tensor([70, ps + 1 if ps < 64 else ps - 1], dtype=torch.int32)
    q = torch.randn(2, seqlen_q, group, 64, dtype=dtype, generator=g)
    check(q, k, v, lens, table, num_splits=num_splits)


@pytest.mark.parametrize("head_dim", DECODE_HEAD_DIMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_head_dims(head_dim, dtype):
    g = torch.Generator().manual_seed(head_dim)
    k, v, table = make_cache(2, 40, 2, head_dim, dtype, 16, g)
    q = torch.randn(2, 2, 4, head_dim, dtype=dtype, generator=g)
    check(q, k, v, torch.tensor([40, 0], dtype=torch.int32), table, num_splits=0)


def test_masks_softcap_alibi():
    g = torch.Generator().manual_seed(9)
    k, v, table = make_cache(2, 48, 2, 64, torch.float32, 16, g)
    q = torch.randn(2, 4, 4, 64, generator=g) * 3
    lens = torch.tensor([48, 2], dtype=torch.int32)
    check(q, k, v, lens, table, window=(5, -1), softcap=4.0, alibi_slopes=torch.rand(4, generator=g), num_splits=2)
    check(q, k, v, lens, table, causal=False, window=(3, 2), num_splits=1)


def test_unsupported_head_dim_is_a_clear_error():
    k, v, _ = make_cache(1, 8, 1, 72, torch.float32)
    with emulate_cuda(), pytest.raises(ValueError, match="head_dim"):
        gk.decode_attention(torch.randn(1, 1, 1, 72), k, v, torch.tensor([8], dtype=torch.int32))


# ---- tensor-core path (fp16/bf16 with seqlen_q x group >= 16 packed rows: decode_attention_mma_kernel)


@pytest.mark.parametrize("page_size", [0, 1, 16, 64])
@pytest.mark.parametrize("group,seqlen_q", [(8, 2), (8, 4), (4, 4), (16, 1)])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_mma_paths(page_size, group, seqlen_q, num_splits):
    g = torch.Generator().manual_seed(page_size * 1000 + group * 10 + seqlen_q + num_splits)
    dtype = torch.float16 if (group + seqlen_q + num_splits) % 2 else torch.bfloat16
    k, v, table = make_cache(4, 70, 2, 64, dtype, page_size, g)
    ps = page_size or 16
    lens = torch.tensor([70, ps + 1 if ps < 64 else ps - 1, 1, 0], dtype=torch.int32)
    q = torch.randn(4, seqlen_q, 2 * group, 64, dtype=dtype, generator=g)
    check(q, k, v, lens, table, num_splits=num_splits)


@pytest.mark.parametrize("head_dim", DECODE_HEAD_DIMS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_mma_head_dims_and_row_blocks(head_dim, dtype):
    # 48 packed rows: several row blocks (32 rows per block, 16 for head dim 256), a partly padded last one
    g = torch.Generator().manual_seed(head_dim + 1)
    k, v, table = make_cache(2, 90, 1, head_dim, dtype, 16, g)
    q = torch.randn(2, 6, 8, head_dim, dtype=dtype, generator=g)
    check(q, k, v, torch.tensor([90, 37], dtype=torch.int32), table, num_splits=0)


@pytest.mark.parametrize("num_splits", [1, 3])
def test_mma_masks_softcap_alibi(num_splits):
    g = torch.Generator().manual_seed(11 + num_splits)
    k, v, table = make_cache(3, 80, 2, 64, torch.bfloat16, 16, g)
    q = (torch.randn(3, 4, 8, 64, generator=g) * 3).bfloat16()
    lens = torch.tensor([80, 2, 33], dtype=torch.int32)
    check(q, k, v, lens, table, window=(5, -1), softcap=4.0, alibi_slopes=torch.rand(8, generator=g), num_splits=num_splits)
    check(q, k, v, lens, table, causal=False, window=(3, 2), num_splits=num_splits)
    check(q, k, v, lens, table, causal=False, alibi_slopes=torch.rand(3, 8, generator=g), num_splits=num_splits)
    check(q.half(), k.half(), v.half(), lens, table, softmax_scale=0.3, window=(17, -1), num_splits=num_splits)


def test_cache_without_tokens():
    """Capacity 0 / an empty page pool (no storage, null K and V): output 0, LSE -inf."""
    q = torch.randn(2, 1, 4, 64)
    lens = torch.zeros(2, dtype=torch.int32)
    for k, table in ((torch.randn(2, 0, 2, 64), None), (torch.randn(0, 16, 2, 64), torch.zeros(2, 1, dtype=torch.int32))):
        with emulate_cuda():
            out, lse = gk.decode_attention(q, k, k.clone(), lens, block_table=table, return_lse=True)
        assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()
