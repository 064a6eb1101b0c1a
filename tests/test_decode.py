"""decode_attention on the CPU against the float64 reference (genkernels.reference)."""
from __future__ import annotations

import pytest
import torch

import genkernels as gk
from genkernels import reference as ref
from genkernels.testing import assert_close, emulate_cuda, has_emulation

from decode_cases import make_cache, to_contiguous


def check(q, k, v, lens, table=None, **kw):
    out, lse = gk.decode_attention(q, k, v, lens, block_table=table, return_lse=True, **kw)
    kw.pop("num_splits", None)
    want, want_lse = ref.decode_attention(q, k, v, lens, block_table=table, **kw)
    base, base_lse = ref.decode_attention(q, k, v, lens, block_table=table, dtype=q.dtype, **kw)
    assert_close("out", out, want, base)
    assert_close("lse", lse, want_lse, base_lse.float() if q.dtype != torch.float32 else None)
    return out, lse


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("page_size", [0, 1, 16, 64])
@pytest.mark.parametrize("group", [1, 3, 4, 8])  # 3: rows of one 4-row block from two kv heads
@pytest.mark.parametrize("seqlen_q", [1, 4])
@pytest.mark.parametrize("num_splits", [1, 3])
# 72: generic SIMD path with a tail; 96 and 128: AVX-512 path (value slabs of 32 and 64 dims)
@pytest.mark.parametrize("head_dim", [72, 96, 128])
def test_matches_reference(dtype, page_size, group, seqlen_q, num_splits, head_dim):
    g = torch.Generator().manual_seed(hash((page_size, group, seqlen_q, num_splits, head_dim)) % 2**31)
    heads_kv, capacity = 2, 130
    k, v, table = make_cache(3, capacity, heads_kv, head_dim, dtype, page_size, g)
    ps = page_size or 16
    lens = torch.tensor([capacity, ps + 1, ps - 1 if ps > 1 else 7], dtype=torch.int32)  # mixed, page +- 1
    q = torch.randn(3, seqlen_q, heads_kv * group, head_dim, dtype=dtype, generator=g)
    check(q, k, v, lens, table, num_splits=num_splits)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [48, 80])
@pytest.mark.parametrize("page_size", [0, 16])
def test_generic_work_item_head_dims(dtype, head_dim, page_size):
    """Head dims that are a multiple of 16 but not of 32 take the generic work item at the
    AVX-512 level too (fp16 and bf16 rows read in place, converted as loaded)."""
    g = torch.Generator().manual_seed(head_dim + page_size)
    k, v, table = make_cache(2, 70, 2, head_dim, dtype, page_size, g)
    q = torch.randn(2, 4, 8, head_dim, dtype=dtype, generator=g)
    check(q, k, v, torch.tensor([70, 19], dtype=torch.int32), table, num_splits=2)
    check(q, k, v, torch.tensor([33, 5], dtype=torch.int32), table, softcap=3.0, num_splits=1)


@pytest.mark.parametrize("num_splits", [0, 1, 4])
def test_paged_equals_contiguous(num_splits):
    g = torch.Generator().manual_seed(1)
    k, v, table = make_cache(4, 200, 2, 64, torch.float32, 16, g)
    kc, vc = to_contiguous(k, table, 208), to_contiguous(v, table, 208)
    lens = torch.tensor([0, 1, 17, 200], dtype=torch.int32)
    q = torch.randn(4, 2, 8, 64, generator=g)
    a = gk.decode_attention(q, k, v, lens, block_table=table, num_splits=num_splits)
    b = gk.decode_attention(q, kc, vc, lens, num_splits=num_splits)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_empty_cache_gives_zero_and_minus_inf():
    k, v, _ = make_cache(2, 8, 1, 64, torch.float32)
    q = torch.randn(2, 3, 2, 64)
    lens = torch.tensor([0, 5], dtype=torch.int32)
    out, lse = gk.decode_attention(q, k, v, lens, return_lse=True, num_splits=2)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert torch.isneginf(lse[0]).all()
    check(q, k, v, lens)


def test_cache_without_tokens():
    """A cache with no room at all (capacity 0, or an empty page pool: tensors without storage)
    is a valid empty cache: output 0 and LSE -inf; a length that would read a token still raises
    (above the capacity, or through a page index outside the empty pool)."""
    q = torch.randn(2, 1, 4, 64)
    lens = torch.zeros(2, dtype=torch.int32)
    contiguous = (torch.randn(2, 0, 2, 64), torch.randn(2, 0, 2, 64), None)
    paged = (torch.randn(0, 16, 2, 64), torch.randn(0, 16, 2, 64), torch.zeros(2, 1, dtype=torch.int32))
    for k, v, table in (contiguous, paged):
        out, lse = gk.decode_attention(q, k, v, lens, block_table=table, return_lse=True)
        assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()
        with pytest.raises(ValueError, match="capacity" if table is None else "block_table"):
            gk.decode_attention(q, k, v, torch.tensor([0, 1], dtype=torch.int32), block_table=table)


@pytest.mark.parametrize("window", [(-1, -1), (5, -1), (0, 0), (3, 2)])
@pytest.mark.parametrize("causal", [True, False])
def test_window_and_causal(window, causal):
    g = torch.Generator().manual_seed(2)
    k, v, table = make_cache(2, 64, 2, 64, torch.float32, 8, g)
    q = torch.randn(2, 4, 4, 64, generator=g)
    lens = torch.tensor([64, 2], dtype=torch.int32)  # seqlen_q > cache length: leading rows see nothing
    check(q, k, v, lens, table, causal=causal, window=window, num_splits=2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_splits", [1, 2])
def test_paged_prefetch_modes_agree(dtype, num_splits):
    """At the AVX-512 level a paged cache takes a second, far prefetch stream unless the previous
    call read the same cache (then taken to be in the last-level cache): a call after one on
    another cache takes it, the repeated call does not; both match the reference, bit for bit
    the same."""
    g = torch.Generator().manual_seed(8)
    k, v, table = make_cache(2, 300, 2, 128, dtype, 16, g)
    other_k, other_v, other_table = make_cache(1, 40, 2, 128, dtype, 16, g)
    q = torch.randn(2, 1, 8, 128, dtype=dtype, generator=g)
    lens = torch.tensor([300, 37], dtype=torch.int32)
    gk.decode_attention(q[:1], other_k, other_v, lens[1:], block_table=other_table)
    far, _ = check(q, k, v, lens, table, num_splits=num_splits)
    near, _ = check(q, k, v, lens, table, num_splits=num_splits)
    assert torch.equal(far, near)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("page_size", [0, 16])
def test_sliding_window_long_cache_automatic_splits(dtype, page_size):
    """The automatic split count and the threading / prefetch choices count the keys a window
    leaves visible, not the cache length: a short window over long caches of mixed lengths (one
    shorter than the window, one empty)."""
    g = torch.Generator().manual_seed(9)
    k, v, table = make_cache(4, 3000, 2, 128, dtype, page_size, g)
    q = torch.randn(4, 2, 8, 128, dtype=dtype, generator=g)
    lens = torch.tensor([3000, 2900, 40, 0], dtype=torch.int32)
    for window in ((100, -1), (300, 0), (0, 0)):
        check(q, k, v, lens, table, window=window, num_splits=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_softcap_alibi_scale(dtype):
    g = torch.Generator().manual_seed(3)
    k, v, table = make_cache(2, 100, 2, 128, dtype, 16, g)
    q = torch.randn(2, 2, 8, 128, dtype=dtype, generator=g) * 4
    lens = torch.tensor([100, 33], dtype=torch.int32)
    check(q, k, v, lens, table, softcap=5.0, softmax_scale=0.2, alibi_slopes=torch.rand(8, generator=g))
    check(q, k, v, lens, table, alibi_slopes=torch.rand(2, 8, generator=g), num_splits=3)


def test_append_then_decode_equals_full_attention():
    """Prefill a cache through append, append one more token, decode; equals attention over the
    whole sequence (reference with every key in one contiguous cache)."""
    g = torch.Generator().manual_seed(4)
    cache = gk.PagedKVCache(num_pages=40, page_size=16, heads_kv=2, head_dim=64)
    seqs = [cache.allocate(), cache.allocate()]
    k_all = torch.randn(2, 50, 2, 64, generator=g)
    v_all = torch.randn(2, 50, 2, 64, generator=g)
    cache.append(seqs, k_all[:, :49], v_all[:, :49])
    cache.append(seqs, k_all[:, 49:], v_all[:, 49:])
    q = torch.randn(2, 1, 8, 64, generator=g)
    out = cache.decode(seqs, q)
    want, _ = ref.decode_attention(q, k_all, v_all, torch.tensor([50, 50], dtype=torch.int32))
    assert_close("out", out, want)
    cache.free(seqs[0])
    assert cache.num_free_pages == 40 - 4


def test_bad_input():
    k, v, table = make_cache(2, 32, 2, 64, torch.float32, 16)
    q = torch.randn(2, 1, 4, 64)
    lens = torch.tensor([32, 3], dtype=torch.int32)
    import numpy as np  # a NumPy integer is an int option too

    assert torch.equal(gk.decode_attention(q, k, v, lens, block_table=table, num_splits=np.int64(2)),
                       gk.decode_attention(q, k, v, lens, block_table=table, num_splits=2))
    with pytest.raises(TypeError, match="num_splits must be an int"):
        gk.decode_attention(q, k, v, lens, block_table=table, num_splits=2.0)
    with pytest.raises(ValueError, match="block_table"):
        bad = table.clone(); bad[1, 0] = -1
        gk.decode_attention(q, k, v, lens, block_table=bad)
    with pytest.raises(ValueError, match="block_table"):
        bad = table.clone(); bad[0, 1] = k.shape[0]
        gk.decode_attention(q, k, v, lens, block_table=bad)
    with pytest.raises(ValueError, match="capacity"):
        gk.decode_attention(q, k, v, torch.tensor([33, 1], dtype=torch.int32), block_table=table)
    with pytest.raises(ValueError, match="capacity"):  # pages smaller than needed
        gk.decode_attention(q, k, v, lens, block_table=table[:, :1])
    with pytest.raises(TypeError, match="k_cache"):
        gk.decode_attention(q.half(), k, v, lens, block_table=table)
    with pytest.raises(TypeError, match="cache_seqlens"):
        gk.decode_attention(q, k, v, lens.long(), block_table=table)
    with pytest.raises(ValueError, match="heads_q"):
        gk.decode_attention(torch.randn(2, 1, 3, 64), k, v, lens, block_table=table)
    with pytest.raises(ValueError, match="page_size"):
        gk.decode_attention(q, k[:, :12], v[:, :12], lens, block_table=table)
    with pytest.raises(ValueError, match="window"):
        gk.decode_attention(q, k, v, lens, block_table=table, window=(-2, 0))
    kc, vc, _ = make_cache(2, 32, 2, 64, torch.float32)
    for cap in (-1.0, float("inf"), float("nan")):  # inf would make every score inf * 0 = NaN
        for cache in ((k, v, table), (kc, vc, None)):  # paged and contiguous (the CPU fast path)
            with pytest.raises(ValueError, match="softcap must be a finite float >= 0"):
                gk.decode_attention(q, cache[0], cache[1], lens, block_table=cache[2], softcap=cap)
    # options of the wrong type are named, not coerced (bool("no") is True, int(2.5) is 2)
    for kw, name in ((dict(causal="yes"), "causal"), (dict(return_lse="no"), "return_lse"),
                     (dict(num_splits=2.5), "num_splits"), (dict(num_splits=True), "num_splits"),
                     (dict(softcap="1"), "softcap")):
        for cache in ((k, v, table), (kc, vc, None)):
            with pytest.raises(TypeError, match=f"{name} must be"):
                gk.decode_attention(q, cache[0], cache[1], lens, block_table=cache[2], **kw)
    for scale, err in ((float("nan"), ValueError), (float("-inf"), ValueError), ("0.1", TypeError)):
        with pytest.raises(err, match="softmax_scale must be a finite float"):
            gk.decode_attention(q, kc, vc, lens, softmax_scale=scale)
    # a bad unused page-table entry is fine: only pages holding tokens are read
    ok = table.clone(); ok[1, 1] = -1
    gk.decode_attention(q, k, v, lens, block_table=ok)


def test_opcheck_and_compile():
    k, v, table = make_cache(2, 32, 2, 64, torch.float32, 16)
    q = torch.randn(2, 1, 4, 64)
    lens = torch.tensor([32, 3], dtype=torch.int32)
    args = (q, k, v, lens, table, True, -1, -1, 0.125, 0.0, None, 0)
    torch.library.opcheck(torch.ops.genkernels.decode_attention.default, args)
    f = torch.compile(lambda q: gk.decode_attention(q, k, v, lens, block_table=table), fullgraph=True)
    torch.testing.assert_close(f(q), gk.decode_attention(q, k, v, lens, block_table=table))


@pytest.mark.parametrize("isa", ["baseline", "avx2"])
def test_lower_isa_levels(isa, monkeypatch):
    """The kernels compiled for the lower ISA levels (chosen with GK_CPU_ISA) agree too."""
    from genkernels import _native

    if isa == "avx2" and _native._C.build_info()["cpu_isa_detected"] not in ("avx2", "avx512"):
        pytest.skip("CPU lacks AVX2")
    monkeypatch.setenv("GK_CPU_ISA", isa)
    _native.reload_cpu_isa()
    try:
        g = torch.Generator().manual_seed(7)
        # head dim 64: bf16 rows read in place at the AVX2 level; 72: through the fp32 tile buffers
        for dtype, page_size, head_dim in ((torch.float32, 16, 64), (torch.bfloat16, 0, 64), (torch.bfloat16, 16, 64),
                                           (torch.bfloat16, 16, 72), (torch.float16, 0, 64)):  # fmt: skip
            k, v, table = make_cache(2, 50, 2, head_dim, dtype, page_size, g)
            q = torch.randn(2, 2, 8, head_dim, dtype=dtype, generator=g)
            check(q, k, v, torch.tensor([50, 9], dtype=torch.int32), table, num_splits=2)
        # the generic work item takes a head's rows in pairs: odd row counts (group 3, or 1 x 3
        # query tokens) and pairs whose rows see different keys (causal / window edges)
        for dtype in (torch.float32, torch.bfloat16):
            for group, seqlen_q, window in ((3, 1, (-1, -1)), (1, 3, (-1, -1)), (1, 3, (5, 0)), (2, 3, (7, -1))):
                k, v, table = make_cache(2, 40, 2, 64, dtype, 16, g)
                q = torch.randn(2, seqlen_q, 2 * group, 64, dtype=dtype, generator=g)
                check(q, k, v, torch.tensor([40, 6], dtype=torch.int32), table, window=window, num_splits=1)
                check(q, k, v, torch.tensor([17, 1], dtype=torch.int32), table, window=window, softcap=5.0,
                      alibi_slopes=torch.rand(2 * group, generator=g), num_splits=3)
    finally:
        monkeypatch.delenv("GK_CPU_ISA")
        _native.reload_cpu_isa()


@pytest.mark.parametrize("page_size", [0, 16])
def test_append_then_decode_equals_flash_attention_prefill(page_size):
    """Chunked append, then 4 speculative tokens decoded at once: equals the last 4 rows of a
    causal flash_attention prefill over the whole sequence."""
    g = torch.Generator().manual_seed(8)
    batch, total, heads_kv, group, head_dim = 2, 45, 2, 4, 64
    q_all = torch.randn(batch, total, heads_kv * group, head_dim, generator=g)
    k_all = torch.randn(batch, total, heads_kv, head_dim, generator=g)
    v_all = torch.randn(batch, total, heads_kv, head_dim, generator=g)
    k, v, table = make_cache(batch, 64, heads_kv, head_dim, torch.float32, page_size, g)
    lens = torch.zeros(batch, dtype=torch.int32)
    for lo, hi in ((0, 20), (20, 21), (21, 45)):
        gk.append_kv_cache(k_all[:, lo:hi], v_all[:, lo:hi], k, v, lens, block_table=table)
    assert lens.tolist() == [total, total]
    out = gk.decode_attention(q_all[:, -4:], k, v, lens, block_table=table, num_splits=2)
    prefill = gk.flash_attention(q_all, k_all, v_all, causal=True)[:, -4:]
    want, _ = ref.decode_attention(q_all[:, -4:], k_all, v_all, lens)
    assert_close("decode", out, want)
    assert_close("decode vs flash_attention", out, prefill.double())


def test_public_call_dispatches_under_fake_and_dispatch_modes():
    # the public function skips the dispatcher only in plain eager mode; fake tensors and
    # dispatch modes must still see genkernels::decode_attention
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode
    from torch.utils._python_dispatch import TorchDispatchMode

    class Seen(TorchDispatchMode):
        ops: list = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    k, v, _ = make_cache(2, 32, 2, 64, torch.float32)
    q, lens = torch.randn(2, 1, 4, 64), torch.tensor([32, 5], dtype=torch.int32)
    with Seen() as seen:
        gk.decode_attention(q, k, v, lens)
    assert any("genkernels.decode_attention" in o for o in seen.ops)
    with FakeTensorMode() as mode:
        out = gk.decode_attention(mode.from_tensor(q), mode.from_tensor(k), mode.from_tensor(v), mode.from_tensor(lens))
    assert out.shape == q.shape
    with FlopCounterMode(display=False):
        assert torch.equal(gk.decode_attention(q, k, v, lens), gk.decode_attention(q, k, v, lens))


def test_fast_and_general_paths_agree():
    # plain eager CPU calls take decode._decode_cpu_fast; arguments it leaves to the general path
    # (a window passed as a new pair, an int softcap) go that way: both must give the same bits
    k, v, table = make_cache(2, 40, 2, 64, torch.bfloat16, 16)
    q = torch.randn(2, 2, 8, 64).bfloat16()
    lens = torch.tensor([40, 7], dtype=torch.int32)
    fast, fast_lse = gk.decode_attention(q, k, v, lens, block_table=table, return_lse=True)
    general, general_lse = gk.decode_attention(q, k, v, lens, block_table=table, window=[-1, -1], softcap=0,
                                               return_lse=True)  # fmt: skip
    assert torch.equal(fast, general) and torch.equal(fast_lse, general_lse)
    assert torch.equal(gk.decode_attention(q, k, v, lens, block_table=table), fast)
    scaled = gk.decode_attention(q, k, v, lens, block_table=table, softmax_scale=0.3)
    assert torch.equal(scaled, gk.decode_attention(q, k, v, lens, block_table=table, softmax_scale=0.3, window=[-1, -1]))
    assert not torch.equal(scaled, fast)


def test_head_dim_zero_is_a_clear_error():
    k = torch.randn(1, 4, 1, 0)
    with pytest.raises(ValueError, match="head_dim"):
        gk.decode_attention(torch.randn(1, 1, 1, 0), k, k, torch.tensor([4], dtype=torch.int32))


@pytest.mark.skipif(not has_emulation(), reason="built without emulation")
def test_emulation_in_another_thread_does_not_reach_this_one():
    # emulate_cuda() is per thread: while another thread is inside it, this thread's calls still
    # run the CPU kernels (head dim 72 has no CUDA kernel, so the emulated path would raise)
    import threading

    k, v, _ = make_cache(1, 8, 1, 72, torch.float32)
    q, lens = torch.randn(1, 1, 1, 72), torch.tensor([8], dtype=torch.int32)
    inside, done, errors = threading.Event(), threading.Event(), []

    def other():
        with emulate_cuda():
            inside.set()
            try:
                gk.decode_attention(q, k, v, lens)
            except ValueError as e:
                errors.append(e)
            done.wait(30)

    t = threading.Thread(target=other)
    t.start()
    try:
        assert inside.wait(30)
        want, _ = ref.decode_attention(q, k, v, lens)
        assert_close("out", gk.decode_attention(q, k, v, lens), want)
    finally:
        done.set()
        t.join(30)
    assert len(errors) == 1 and "head_dim" in str(errors[0])
    assert_close("out after", gk.decode_attention(q, k, v, lens), want)
