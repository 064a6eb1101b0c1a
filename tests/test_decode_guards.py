"""The CUDA decode / append / rotary kernels guard against bad index values themselves (on a GPU the
host does not read cache_seqlens / block_table / positions: that would synchronise). Run through
the emulator with the host checks switched off (as on CUDA), with the cache placed inside a larger
tensor whose surrounding canary region must stay untouched: a bad sequence is an error state
(decode: NaN output and LSE; append: nothing written, length not advanced; rotary: NaN row),
every other sequence is computed normally, nothing outside the cache is addressed."""
from __future__ import annotations

import contextlib
import subprocess
import sys

import pytest
import torch

import genkernels as gk
from genkernels import _native
from genkernels import reference as ref
from genkernels.testing import assert_close, emulate_cuda, has_emulation

pytestmark = [pytest.mark.emulated, pytest.mark.skipif(not has_emulation(), reason="built without emulation")]

CANARY = 1234.5  # exactly representable in fp32/bf16/fp16; never produced by the kernels here
HEADS_KV, HEAD_DIM, PAGE = 2, 64, 16


@contextlib.contextmanager
def unchecked_emulation():
    """Emulated CUDA kernels with the host index checks off, as on a real GPU."""
    old = _native._C._set_emulate_unchecked_indices(True)
    try:
        with emulate_cuda():
            yield
    finally:
        _native._C._set_emulate_unchecked_indices(old)


def guarded_pool(num_pages, dtype, g, pad=3):
    """A paged K or V pool of `num_pages` pages inside a tensor with `pad` canary pages each side."""
    big = torch.full((num_pages + 2 * pad, PAGE, HEADS_KV, HEAD_DIM), CANARY, dtype=dtype)
    big[pad:-pad] = torch.randn(num_pages, PAGE, HEADS_KV, HEAD_DIM, generator=g).to(dtype)
    return big, big[pad:-pad]


def guarded_contiguous(batch, capacity, dtype, g, pad=8):
    """A contiguous (batch, capacity, H, D) cache as a token slice of a canary-padded tensor."""
    big = torch.full((batch, capacity + 2 * pad, HEADS_KV, HEAD_DIM), CANARY, dtype=dtype)
    big[:, pad:-pad] = torch.randn(batch, capacity, HEADS_KV, HEAD_DIM, generator=g).to(dtype)
    return big, big[:, pad:-pad], pad


def canaries_intact(big, inner_slices):
    mask = torch.ones(big.shape[:2], dtype=torch.bool)
    mask[inner_slices] = False
    return bool((big[mask] == CANARY).all())


def check_decode(q, k, v, lens, table, bad, num_splits):
    with unchecked_emulation():
        out, lse = gk.decode_attention(q, k, v, lens, block_table=table, num_splits=num_splits, return_lse=True)
    good = [b for b in range(q.shape[0]) if b not in bad]
    for b in bad:
        assert torch.isnan(out[b]).all(), f"sequence {b}: expected the NaN error state"
        assert torch.isnan(lse[b]).all()
    sel = torch.tensor(good)
    args = (q[sel], k if table is not None else k[sel], v if table is not None else v[sel], lens[sel])
    bt = None if table is None else table[sel]
    want, want_lse = ref.decode_attention(*args, block_table=bt)
    base, base_lse = ref.decode_attention(*args, block_table=bt, dtype=q.dtype)
    assert_close("out", out[sel], want, base)
    assert_close("lse", lse[sel], want_lse, base_lse.float() if q.dtype != torch.float32 else None)


def check_bad_page(seed, dtype, seqlen_q, heads_q, bad_page, num_splits):
    """Three sequences over a guarded pool, one bad page in the table of sequence 1 (length 50):
    only that sequence is an error state."""
    g = torch.Generator().manual_seed(seed)
    batch, max_pages = 3, 4
    num_pages = batch * max_pages
    kbig, k = guarded_pool(num_pages, dtype, g)
    vbig, v = guarded_pool(num_pages, dtype, g)
    table = torch.randperm(num_pages, generator=g)[: batch * max_pages].view(batch, max_pages).to(torch.int32)
    table[1, 2] = num_pages if bad_page == "num_pages" else bad_page  # page in use by sequence 1 (length 50)
    lens = torch.tensor([60, 50, 33], dtype=torch.int32)
    q = torch.randn(batch, seqlen_q, heads_q, HEAD_DIM, generator=g).to(dtype)
    check_decode(q, k, v, lens, table, bad={1}, num_splits=num_splits)


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("bad_page", [-1, "num_pages", -3])
def test_decode_bad_page_index(num_splits, bad_page):
    check_bad_page(7, torch.float32, 1, 8, bad_page, num_splits)


@pytest.mark.parametrize("num_splits", [1, 2])
@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("bad_len", [-5, 65, 2**31 - 1])
def test_decode_bad_length(num_splits, paged, bad_len):
    g = torch.Generator().manual_seed(8)
    batch, capacity = 3, 64
    if paged:
        _, k = guarded_pool(batch * capacity // PAGE, torch.bfloat16, g)
        _, v = guarded_pool(batch * capacity // PAGE, torch.bfloat16, g)
        table = torch.arange(batch * capacity // PAGE, dtype=torch.int32).flip(0).view(batch, -1).contiguous()
    else:
        _, k, _ = guarded_contiguous(batch, capacity, torch.bfloat16, g)
        _, v, _ = guarded_contiguous(batch, capacity, torch.bfloat16, g)
        table = None
    lens = torch.tensor([capacity, bad_len, 17], dtype=torch.int32)
    q = torch.randn(batch, 2, 4, HEAD_DIM, generator=g).bfloat16()
    check_decode(q, k, v, lens, table, bad={1}, num_splits=num_splits)


def test_decode_error_state_does_not_leak_into_other_sequences_cpu_still_raises():
    # the CPU path (and emulation with its checks on) still rejects the same call up front
    g = torch.Generator().manual_seed(9)
    _, k = guarded_pool(4, torch.float32, g)
    _, v = guarded_pool(4, torch.float32, g)
    table = torch.tensor([[0, 1], [2, 9]], dtype=torch.int32)
    lens = torch.tensor([20, 20], dtype=torch.int32)
    q = torch.randn(2, 1, 2, HEAD_DIM, generator=g)
    for ctx in (contextlib.nullcontext(), emulate_cuda()):
        with ctx, pytest.raises(ValueError, match=r"block_table\[1, 1\]"):
            gk.decode_attention(q, k, v, lens, block_table=table)


@pytest.mark.parametrize("case", ["page_negative", "page_past_pool", "over_capacity", "negative_length", "rotary_table"])
def test_append_out_of_range_sequence_is_skipped(case):
    g = torch.Generator().manual_seed(10)
    dtype = torch.float32
    batch, new, max_pages = 3, 3, 4
    num_pages = batch * max_pages
    kbig, k = guarded_pool(num_pages, dtype, g)
    vbig, v = guarded_pool(num_pages, dtype, g)
    table = torch.arange(num_pages, dtype=torch.int32).view(batch, max_pages).contiguous()
    lens = torch.tensor([5, 30, 14], dtype=torch.int32)  # sequence 1 writes tokens 30..32: pages 1 and 2
    cos = sin = None
    if case == "page_negative":
        table[1, 2] = -1
    elif case == "page_past_pool":
        table[1, 1] = num_pages
    elif case == "over_capacity":
        lens[1] = max_pages * PAGE - 1
    elif case == "negative_length":
        lens[1] = -2
    ang = torch.rand(64 if case != "rotary_table" else 32, HEAD_DIM // 2, generator=g)
    cos, sin = ang.cos(), ang.sin()
    k_new = torch.randn(batch, new, HEADS_KV, HEAD_DIM, generator=g)
    v_new = torch.randn_like(k_new)
    k0, v0, lens0 = k.clone(), v.clone(), lens.clone()
    with unchecked_emulation():
        gk.append_kv_cache(k_new, v_new, k, v, lens, block_table=table, rotary_cos=cos, rotary_sin=sin)
    assert canaries_intact(kbig, (slice(3, -3),)) and canaries_intact(vbig, (slice(3, -3),))
    assert int(lens[1]) == int(lens0[1]), "the rejected sequence must not advance"
    # the rejected sequence wrote nothing: only the good sequences' new tokens changed
    changed = (k != k0).flatten(2).any(-1) | (v != v0).flatten(2).any(-1)  # (page, token)
    expect = torch.zeros_like(changed)
    for b in (0, 2):
        assert int(lens[b]) == int(lens0[b]) + new
        for t in range(int(lens0[b]), int(lens0[b]) + new):
            expect[int(table[b, t // PAGE]), t % PAGE] = True
    assert torch.equal(changed, expect)
    pos = lens0[:, None].long() + torch.arange(new)
    if case != "rotary_table":
        want = ref.apply_rotary(k_new, cos, sin, pos.clamp(0, cos.shape[0] - 1))
        for b in (0, 2):
            for s in range(new):
                t = int(lens0[b]) + s
                assert_close("k", k[int(table[b, t // PAGE]), t % PAGE], want[b, s])


def test_append_contiguous_over_capacity_writes_nothing():
    g = torch.Generator().manual_seed(11)
    batch, capacity, new = 2, 40, 4
    kbig, k, pad = guarded_contiguous(batch, capacity, torch.float16, g)
    vbig, v, _ = guarded_contiguous(batch, capacity, torch.float16, g)
    lens = torch.tensor([10, capacity - 2], dtype=torch.int32)
    k_new = torch.randn(batch, new, HEADS_KV, HEAD_DIM, generator=g).half()
    k0 = k.clone()
    with unchecked_emulation():
        gk.append_kv_cache(k_new, k_new, k, v, lens, block_table=None)
    assert lens.tolist() == [10 + new, capacity - 2]
    inner = (slice(None), slice(pad, pad + capacity))
    assert canaries_intact(kbig, inner) and canaries_intact(vbig, inner)
    assert torch.equal(k[1], k0[1]) and torch.equal(k[0, 10:14], k_new[0])


def test_apply_rotary_out_of_table_position_is_nan():
    g = torch.Generator().manual_seed(12)
    x = torch.randn(2, 3, 2, HEAD_DIM, generator=g)
    ang = torch.rand(16, HEAD_DIM // 2, generator=g)
    pos = torch.tensor([[0, 5, 15], [16, -1, 3]], dtype=torch.int32)
    with unchecked_emulation():
        out = gk.apply_rotary(x, ang.cos(), ang.sin(), pos)
    assert torch.isnan(out[1, :2]).all()
    good = [(0, 0), (0, 1), (0, 2), (1, 2)]
    want = ref.apply_rotary(x, ang.cos(), ang.sin(), pos.clamp(0, 15).long())
    for b, s in good:
        assert_close("out", out[b, s], want[b, s])


def test_far_out_of_range_indices_in_a_subprocess():
    # Indices that would address unmapped memory if the guard failed: a crash fails this test
    # without taking pytest down.
    code = r"""
import torch, genkernels as gk
from genkernels import _native
from genkernels.testing import emulate_cuda
_native._C._set_emulate_unchecked_indices(True)
k = torch.randn(4, 16, 1, 64); v = torch.randn_like(k)
q = torch.randn(2, 1, 2, 64)
with emulate_cuda():
    for bad in (2**31 - 1, -2**31):
        table = torch.tensor([[0, 1], [2, bad]], dtype=torch.int32)
        out = gk.decode_attention(q, k, v, torch.tensor([20, 20], dtype=torch.int32), block_table=table)
        assert torch.isnan(out[1]).all() and not torch.isnan(out[0]).any()
        lens = torch.tensor([3, 15], dtype=torch.int32)
        gk.append_kv_cache(torch.randn(2, 2, 1, 64), torch.randn(2, 2, 1, 64), k, v, lens, block_table=table)
        assert lens.tolist() == [5, 15]
print("ok")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-2000:]


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("bad_page", [-1, "num_pages"])
def test_decode_bad_page_index_tensor_core_path(num_splits, bad_page):
    # bf16 with seqlen_q x group = 2 x 8 = 16 rows: the mma kernel; same guard as the scalar one
    check_bad_page(17, torch.bfloat16, 2, 16, bad_page, num_splits)


@pytest.mark.parametrize("bad_len", [-5, 65])
def test_decode_bad_length_tensor_core_path(bad_len):
    g = torch.Generator().manual_seed(19)
    kbig, k, _ = guarded_contiguous(3, 64, torch.float16, g)
    vbig, v, _ = guarded_contiguous(3, 64, torch.float16, g)
    lens = torch.tensor([64, bad_len, 5], dtype=torch.int32)
    q = torch.randn(3, 4, 8, HEAD_DIM, generator=g).half()
    check_decode(q, k, v, lens, None, bad={1}, num_splits=2)
