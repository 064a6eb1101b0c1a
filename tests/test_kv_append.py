"""append_kv_cache (with fused RoPE), apply_rotary and PagedKVCache against the reference, on
the CPU and through the emulated CUDA kernels."""
from __future__ import annotations

import contextlib

import pytest
import torch

import genkernels as gk
from genkernels import reference as ref
from genkernels.testing import assert_close, emulate_cuda, has_emulation

from decode_cases import make_cache, to_contiguous

MODES = ["cpu"] + (["emulated"] if has_emulation() else [])


def run_in(mode):
    return emulate_cuda() if mode == "emulated" else contextlib.nullcontext()


def tables(positions, rotary_dim, g):
    inv = 1.0 / (10000 ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim))
    ang = torch.arange(positions, dtype=torch.float64)[:, None] * inv[None] + torch.rand(1, generator=g, dtype=torch.float64)
    return ang.cos().float(), ang.sin().float()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("rotary_dim", [64, 32, 0])
@pytest.mark.parametrize("page_size", [0, 1, 16])
def test_append_matches_reference(mode, dtype, interleaved, rotary_dim, page_size):
    g = torch.Generator().manual_seed(rotary_dim + page_size)
    batch, heads_kv, head_dim, capacity, new = 3, 2, 64, 40, 3
    k, v, table = make_cache(batch, capacity, heads_kv, head_dim, dtype, page_size, g)
    lens = torch.tensor([0, 7, 37], dtype=torch.int32)  # odd positions, up to the capacity
    k_new = torch.randn(batch, new, heads_kv, head_dim, dtype=dtype, generator=g)
    v_new = torch.randn_like(k_new)
    rot = {}
    if rotary_dim:
        cos, sin = tables(capacity, rotary_dim, g)
        rot = dict(rotary_cos=cos, rotary_sin=sin, rotary_interleaved=interleaved)
    k0, v0, lens0 = k.clone(), v.clone(), lens.clone()
    with run_in(mode):
        gk.append_kv_cache(k_new, v_new, k, v, lens, block_table=table, **rot)
    assert torch.equal(lens, lens0 + new)
    pos = lens0[:, None].long() + torch.arange(new)
    want_k = ref.apply_rotary(k_new, cos, sin, pos, interleaved=interleaved) if rotary_dim else k_new.double()
    cap = capacity if not page_size else table.shape[1] * page_size
    kc = k if table is None else to_contiguous(k, table, cap)
    vc = v if table is None else to_contiguous(v, table, cap)
    kc0 = k0 if table is None else to_contiguous(k0, table, cap)
    for b in range(batch):
        s = slice(int(lens0[b]), int(lens0[b]) + new)
        assert_close("k", kc[b, s], want_k[b], ref.apply_rotary(k_new, cos, sin, pos, dtype=dtype, interleaved=interleaved)[b] if rotary_dim else None)
        assert torch.equal(vc[b, s], v_new[b])
        assert torch.equal(kc[b, : int(lens0[b])], kc0[b, : int(lens0[b])])  # earlier tokens untouched


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("interleaved", [False, True])
def test_apply_rotary(mode, interleaved):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 4, 64, dtype=torch.bfloat16, generator=g)
    cos, sin = tables(50, 48, g)
    start = torch.tensor([0, 41], dtype=torch.int32)
    with run_in(mode):
        out = gk.apply_rotary(x, cos, sin, start, interleaved=interleaved)
    pos = start[:, None].long() + torch.arange(3)
    assert_close("q", out, ref.apply_rotary(x, cos, sin, pos, interleaved=interleaved),
                 ref.apply_rotary(x, cos, sin, pos, interleaved=interleaved, dtype=torch.bfloat16))


def test_capacity_checked_before_any_write():
    k, v, table = make_cache(2, 32, 1, 64, torch.float32, 16)
    lens = torch.tensor([3, 30], dtype=torch.int32)
    k0, v0 = k.clone(), v.clone()
    with pytest.raises(ValueError, match="capacity"):
        gk.append_kv_cache(torch.randn(2, 3, 1, 64), torch.randn(2, 3, 1, 64), k, v, lens, block_table=table)
    assert torch.equal(k, k0) and torch.equal(v, v0) and lens.tolist() == [3, 30]
    bad = table.clone(); bad[0, 0] = 99
    with pytest.raises(ValueError, match="block_table"):
        gk.append_kv_cache(torch.randn(2, 1, 1, 64), torch.randn(2, 1, 1, 64), k, v, lens, block_table=bad)
    with pytest.raises(TypeError, match="k_new"):
        gk.append_kv_cache(torch.randn(2, 1, 1, 64).half(), torch.randn(2, 1, 1, 64), k, v, lens, block_table=table)
    cos, sin = tables(8, 64, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="rotary"):
        gk.append_kv_cache(torch.randn(2, 1, 1, 64), torch.randn(2, 1, 1, 64), k, v, lens, block_table=table,
                           rotary_cos=cos, rotary_sin=sin)


@pytest.mark.parametrize("mode", MODES)
def test_append_rejects_writes_into_one_slot(mode):
    """Block tables may share pages (a common prefix) but not the slots a call writes: two
    sequences appending into a shared page, or a table that lists a page twice where it appends,
    raise before anything is written. Aliased cache memory raises too."""
    g = torch.Generator().manual_seed(3)
    k, v = torch.randn(6, 4, 1, 64, generator=g), torch.randn(6, 4, 1, 64, generator=g)  # 6 pages of 4 tokens
    new_k, new_v = torch.randn(2, 2, 1, 64, generator=g), torch.randn(2, 2, 1, 64, generator=g)
    table = torch.tensor([[0, 1], [0, 2]], dtype=torch.int32)  # page 0: a prefix both sequences share

    def append(lens, tbl, kn=new_k, vn=new_v):
        with run_in(mode):
            gk.append_kv_cache(kn, vn, k, v, lens, block_table=tbl)

    lens = torch.tensor([4, 4], dtype=torch.int32)  # each appends into a page of its own
    append(lens, table)
    assert lens.tolist() == [6, 6]
    assert torch.equal(k[1, :2], new_k[0]) and torch.equal(k[2, :2], new_k[1]) and torch.equal(v[2, :2], new_v[1])
    adjacent = torch.tensor([[3, 4], [3, 5]], dtype=torch.int32)  # slots 0-1 and 2-3 of page 3: disjoint
    lens = torch.tensor([0, 2], dtype=torch.int32)
    append(lens, adjacent)
    assert lens.tolist() == [2, 4] and torch.equal(k[3, :2], new_k[0]) and torch.equal(k[3, 2:], new_k[1])

    k0, v0 = k.clone(), v.clone()
    lens = torch.tensor([2, 2], dtype=torch.int32)  # both into slots 2-3 of the shared page 0
    with pytest.raises(ValueError, match="sequences 0 and 1 would both write slot 2 of page 0"):
        append(lens, table)
    twice = torch.tensor([[5, 5]], dtype=torch.int32)  # tokens 1-3 -> slots 1-3, tokens 4-6 -> slots 0-2
    lens1 = torch.tensor([1], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"sequence 0 would write slot 1 of page 5 twice \(block_table\[0\]"):
        append(lens1, twice, torch.randn(1, 6, 1, 64), torch.randn(1, 6, 1, 64))
    assert torch.equal(k, k0) and torch.equal(v, v0) and lens.tolist() == [2, 2] and lens1.tolist() == [1]

    shared = torch.zeros(1, 8, 1, 64).expand(2, 8, 1, 64)  # one row of memory for both sequences
    with pytest.raises(ValueError, match="k_cache has elements that share memory"):
        gk.append_kv_cache(new_k, new_v, shared, torch.zeros(2, 8, 1, 64), torch.zeros(2, dtype=torch.int32))
    with pytest.raises(ValueError, match="v_cache has elements that share memory"):
        gk.append_kv_cache(new_k, new_v, torch.zeros(2, 8, 1, 64), shared, torch.zeros(2, dtype=torch.int32))
    same = torch.zeros(2, 8, 1, 64)
    with pytest.raises(ValueError, match="k_cache and v_cache are the same memory"):
        gk.append_kv_cache(new_k, new_v, same, same, torch.zeros(2, dtype=torch.int32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("page_size", [0, 16])
@pytest.mark.parametrize("rotary", ["none", "fp32", "bf16"])
def test_append_fast_path_equals_op(dtype, page_size, rotary):
    """Plain CPU calls skip the dispatcher (kv_cache._append_cpu_fast): same bits as the
    registered op, and the fast path is really taken when it should be (float32 tables only;
    other tables and caches that are views take the general path)."""
    from genkernels import kv_cache

    g = torch.Generator().manual_seed(5)
    k0, v0, table = make_cache(3, 40, 2, 64, dtype, page_size)
    lens0 = torch.tensor([0, 17, 31], dtype=torch.int32)
    kn = torch.randn(3, 5, 4, 64, generator=g).to(dtype)[:, :, ::2]  # strided heads
    vn = torch.randn(3, 5, 2, 64, generator=g).to(dtype)
    cos, sin = tables(64, 32, g) if rotary != "none" else (None, None)
    if rotary == "bf16":
        cos, sin = cos.bfloat16(), sin.bfloat16()
    want_k, want_v, want_lens = k0.clone(), v0.clone(), lens0.clone()
    torch.ops.genkernels.append_kv_cache(kn, vn, want_k, want_v, want_lens, table, cos, sin, True)
    assert want_lens.tolist() == [5, 22, 36]

    k, v, lens = k0.clone(), v0.clone(), lens0.clone()
    taken = kv_cache._append_cpu_fast(kn, vn, k, v, lens, table, cos, sin, True)
    assert taken == (rotary != "bf16")
    if not taken:
        assert torch.equal(k, k0) and torch.equal(lens, lens0)  # declined: nothing written
    k, v, lens = k0.clone(), v0.clone(), lens0.clone()
    gk.append_kv_cache(kn, vn, k, v, lens, block_table=table, rotary_cos=cos, rotary_sin=sin, rotary_interleaved=True)
    assert torch.equal(k, want_k) and torch.equal(v, want_v) and torch.equal(lens, want_lens)

    if page_size == 0:  # caches that are views (not contiguous) take the general path and append the same
        big_k, big_v = torch.zeros(3, 48, 2, 64, dtype=dtype), torch.zeros(3, 48, 2, 64, dtype=dtype)
        view_k, view_v = big_k[:, :40], big_v[:, :40]
        view_k.copy_(k0), view_v.copy_(v0)
        lens = lens0.clone()
        assert not kv_cache._append_cpu_fast(kn, vn, view_k, view_v, lens, None, cos, sin, True)
        gk.append_kv_cache(kn, vn, view_k, view_v, lens, rotary_cos=cos, rotary_sin=sin, rotary_interleaved=True)
        assert torch.equal(view_k, want_k) and torch.equal(view_v, want_v) and torch.equal(lens, want_lens)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_fast_path_equals_op(dtype):
    """apply_rotary's plain CPU calls skip the dispatcher (kv_cache._rotary_cpu_fast): same bits
    as the registered op; taken for int32 positions ((batch, seqlen), or (batch,) for one
    token) and float32 tables, declined (general path, same result) otherwise."""
    from genkernels import kv_cache

    g = torch.Generator().manual_seed(6)
    cos, sin = tables(64, 48, g)
    x = torch.randn(3, 4, 6, 64, generator=g).to(dtype)[:, :, ::2]  # strided heads
    pos2 = torch.randint(0, 64, (3, 4), generator=g, dtype=torch.int32)
    start = torch.tensor([0, 9, 60], dtype=torch.int32)
    for xx, pos, taken in ((x, pos2, True), (x, pos2.t().contiguous().t(), True), (x[:, :1], start, True),
                           (x, start, False), (x, pos2.long(), False)):  # fmt: skip
        want = torch.ops.genkernels.apply_rotary(xx, cos, sin, pos, True)
        fast = kv_cache._rotary_cpu_fast(xx, cos, sin, pos, True)
        assert (fast is not None) == taken
        if taken:
            assert torch.equal(fast, want)
        assert torch.equal(gk.apply_rotary(xx, cos, sin, pos, interleaved=True), want)
    assert kv_cache._rotary_cpu_fast(x, cos.bfloat16(), sin.bfloat16(), pos2, False) is None
    with pytest.raises(ValueError, match=r"positions\[2, 1\] = 64 is outside"):
        gk.apply_rotary(x, cos, sin, pos2.clone().index_put_((torch.tensor(2), torch.tensor(1)), torch.tensor(64, dtype=torch.int32)))


def test_paged_kv_cache_block_table_matches_its_pages():
    """block_table() reads a table kept up to date as pages come and go: after a random run of
    allocate / reserve / extend / free (more sequences and pages than the table starts with,
    rows reused after free), every batch's table is each sequence's pages padded with page 0."""
    import random

    rng = random.Random(4)
    cache = gk.PagedKVCache(num_pages=400, page_size=2, heads_kv=1, head_dim=8)
    live: list[int] = []
    for step in range(600):
        op = rng.random()
        if op < 0.3 and cache.num_free_pages >= 8:
            live.append(cache.allocate(rng.randrange(0, 16)))
        elif op < 0.6 and live:
            s = rng.choice(live)
            with contextlib.suppress(MemoryError):
                cache.extend(s, rng.randrange(0, 40))
            cache._lengths[s] = min(cache._lengths[s] + 1, len(cache._pages[s]) * 2)  # as append would
        elif op < 0.8 and live:
            with contextlib.suppress(MemoryError):
                cache.reserve(rng.choice(live), rng.randrange(0, 80))
        elif live:
            cache.free(live.pop(rng.randrange(len(live))))
        if live and step % 7 == 0:
            batch = rng.sample(live, rng.randrange(1, len(live) + 1))
            pages = [cache._pages[s] for s in batch]
            width = max(len(p) for p in pages + [[0]])
            want = torch.tensor([p + [0] * (width - len(p)) for p in pages], dtype=torch.int32)
            assert torch.equal(cache.block_table(batch), want), step
    assert len(cache._row) == len(live) and cache._table.shape[0] > 8 and cache._table.shape[1] > 16
    assert cache.block_table([]).shape == (0, 1)


def test_paged_kv_cache_bookkeeping_and_bad_input():
    """Pages are handed out and returned exactly; a request that cannot be met changes nothing;
    unknown ids, negative or non-integer counts and wrong option types are named."""
    cache = gk.PagedKVCache(num_pages=4, page_size=16, heads_kv=1, head_dim=32)
    a = cache.allocate(20)  # 2 pages
    assert cache.num_free_pages == 2 and cache.block_table([a]).shape == (1, 2)
    with pytest.raises(MemoryError, match="needs 3 pages, 2 are free"):
        cache.allocate(40)
    assert cache.num_free_pages == 2  # the failed allocation took no pages and left no sequence
    b = cache.allocate()
    assert b == a + 1 and cache.length(b) == 0
    cache.extend(b, 32)
    assert cache.num_free_pages == 0
    with pytest.raises(MemoryError):
        cache.extend(a, 33)
    cache.free(a)
    assert cache.num_free_pages == 2
    for call, err, match in ((lambda: cache.free(a), KeyError, "no sequence"),
                             (lambda: cache.extend(99, 1), KeyError, "no sequence 99"),
                             (lambda: cache.block_table([b, 7]), KeyError, "no sequence 7"),
                             (lambda: cache.extend(b, -1), ValueError, "num_new_tokens must be >= 0"),
                             (lambda: cache.allocate(-3), ValueError, "num_tokens must be >= 0"),
                             (lambda: cache.allocate(2.5), TypeError, "num_tokens must be an int"),
                             (lambda: gk.PagedKVCache(4.0, 16, 1, 32), TypeError, "num_pages must be an int"),
                             (lambda: gk.PagedKVCache(4, 12, 1, 32), ValueError, "page_size must be a power of two"),
                             (lambda: gk.PagedKVCache(4, 16, 0, 32), ValueError, "heads_kv and head_dim")):
        with pytest.raises(err, match=match):
            call()
    assert cache.num_free_pages == 2
    x, cos, sin = torch.randn(1, 1, 1, 32), torch.randn(4, 16), torch.randn(4, 16)
    with pytest.raises(TypeError, match="interleaved must be a bool"):
        gk.apply_rotary(x, cos, sin, torch.zeros(1, 1, dtype=torch.int32), interleaved="no")
    with pytest.raises(TypeError, match="rotary_interleaved must be a bool"):
        cache.append([b], x, x, rotary_cos=cos, rotary_sin=sin, rotary_interleaved="no")


def test_paged_kv_cache_append_is_all_or_nothing():
    """A batch append that cannot be met (too few pages for the whole batch, a repeated or unknown
    id, a batch of the wrong size) raises before any sequence grows; repeated ids would have had
    two rows write one slot and the length advance twice."""
    cache = gk.PagedKVCache(num_pages=3, page_size=4, heads_kv=1, head_dim=32)
    a, b = cache.allocate(), cache.allocate()
    kv = torch.randn(2, 5, 1, 32)  # 2 pages per sequence: 4 needed, 3 free
    with pytest.raises(MemoryError, match="needs 4 more pages, 3 are free"):
        cache.append([a, b], kv, kv)
    assert cache.num_free_pages == 3 and cache.block_table([a, b]).shape == (2, 1)
    for seqs, x, err, match in (([a, a], kv, ValueError, r"distinct .* got \[0\] more than once"),
                                ([a, 9], kv, KeyError, "no sequence 9"),
                                ([a], kv, ValueError, r"k_new must be \(len\(seqs\)=1")):
        with pytest.raises(err, match=match):
            cache.append(seqs, x, x)
        assert cache.num_free_pages == 3 and cache.length(a) == cache.length(b) == 0
    cache.append([a, b], kv[:, :4], kv[:, :4])  # fits: one page each
    assert cache.num_free_pages == 1 and cache.length(a) == cache.length(b) == 4
    got = ref.gather_kv(cache.k, 4, 1, cache.block_table([a, b]))
    torch.testing.assert_close(got, kv[1, :4], rtol=0, atol=0)


def test_append_rope_then_decode_equals_prefill():
    """Keys appended with RoPE token by token, queries rotated with apply_rotary: decode equals
    the reference attention over rotated keys of the whole sequence."""
    g = torch.Generator().manual_seed(6)
    cache = gk.PagedKVCache(num_pages=16, page_size=4, heads_kv=2, head_dim=64)
    seqs = [cache.allocate(), cache.allocate()]
    cos, sin = tables(64, 64, g)
    k_all, v_all = torch.randn(2, 21, 2, 64, generator=g), torch.randn(2, 21, 2, 64, generator=g)
    rot = dict(rotary_cos=cos, rotary_sin=sin)
    cache.append(seqs, k_all[:, :13], v_all[:, :13], **rot)
    for t in range(13, 21):
        cache.append(seqs, k_all[:, t : t + 1], v_all[:, t : t + 1], **rot)
    q = torch.randn(2, 1, 8, 64, generator=g)
    q_rot = gk.apply_rotary(q, cos, sin, torch.tensor([20, 20], dtype=torch.int32))
    out = cache.decode(seqs, q_rot)
    pos = torch.arange(21)[None].expand(2, 21)
    k_rot = ref.apply_rotary(k_all, cos, sin, pos)
    want, _ = ref.decode_attention(ref.apply_rotary(q, cos, sin, torch.tensor([[20], [20]])), k_rot, v_all.double(),
                                   torch.tensor([21, 21], dtype=torch.int32))
    base, _ = ref.decode_attention(q_rot, k_rot.float(), v_all, torch.tensor([21, 21], dtype=torch.int32), dtype=torch.float32)
    assert_close("out", out, want, base)


def test_append_opcheck():
    k, v, table = make_cache(2, 32, 1, 64, torch.float32, 16)
    lens = torch.tensor([3, 5], dtype=torch.int32)
    args = (torch.randn(2, 1, 1, 64), torch.randn(2, 1, 1, 64), k, v, lens, table, None, None, False)
    torch.library.opcheck(torch.ops.genkernels.append_kv_cache.default, args, test_utils=("test_schema", "test_faketensor"))


def test_rotary_opcheck_and_compile():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 4, 64, generator=g)
    cos, sin = tables(16, 32, g)
    pos = torch.tensor([[0, 1, 2], [5, 6, 7]], dtype=torch.int32)
    torch.library.opcheck(torch.ops.genkernels.apply_rotary.default, (x, cos, sin, pos, True))
    k, v, table = make_cache(2, 32, 4, 64, torch.float32, 16, g)
    lens = torch.tensor([3, 5], dtype=torch.int32)

    def step(x, lens):
        gk.append_kv_cache(x, x, k, v, lens, block_table=table, rotary_cos=cos, rotary_sin=sin)
        return gk.decode_attention(gk.apply_rotary(x, cos, sin, lens - 3), k, v, lens, block_table=table)

    want = step(x, lens.clone())
    lens2 = torch.tensor([3, 5], dtype=torch.int32)
    got = torch.compile(step)(x, lens2)
    assert lens2.tolist() == [6, 8]
    torch.testing.assert_close(got, want, rtol=0, atol=0)
