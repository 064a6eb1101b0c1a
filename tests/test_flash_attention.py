"""flash_attention / flash_attention_varlen against the float64 reference with the tolerance rule,
on every CPU ISA level: causal x window x GQA x softcap x ALiBi x LSE, every dtype, head dims 8..256,
odd lengths, seqlen_q above and below seqlen_k, rows that see no key; agreement with PyTorch's
scaled_dot_product_attention; strided inputs. API checks (opcheck, torch.compile, bad input) live
in test_flash_attention_api.py."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import genkernels as gk
from genkernels import reference as ref_mod
from genkernels.testing import assert_close

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
NEG_INF = float("-inf")


def skip_emulated(backend):
    if backend == "emulated":
        pytest.skip("these shapes are CPU-kernel tests; the emulated CUDA kernel has its own small-shape tests")


def make_qkv(rng, b, sq, sk, hq, hkv, d, dtype, varlen=False):
    lead_q, lead_k = ((sq,), (sk,)) if varlen else ((b, sq), (b, sk))
    q = torch.randn(*lead_q, hq, d, generator=rng).to(dtype)
    k = torch.randn(*lead_k, hkv, d, generator=rng).to(dtype)
    v = torch.randn(*lead_k, hkv, d, generator=rng).to(dtype)
    return q, k, v


def check(q, k, v, out, lse, **opts):
    """out/lse against the float64 reference; PyTorch's own error is the same reference computed
    in the input dtype (float32 for the lse, which the kernels accumulate in float32)."""
    want_out, want_lse = ref_mod.flash_attention(q, k, v, **opts)
    base_out, _ = ref_mod.flash_attention(q, k, v, dtype=q.dtype, **opts)
    assert_close("out", out, want_out, baseline=base_out)
    if lse is not None:
        _, base_lse = ref_mod.flash_attention(q, k, v, dtype=torch.float32, **opts)
        assert_close("lse", lse, want_lse, baseline=base_lse)


# (batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim, causal, window, softcap, alibi)
FEATURES = [
    (2, 7, 7, 2, 2, 64, False, (-1, -1), 0.0, None),
    (1, 33, 70, 4, 2, 32, True, (-1, -1), 0.0, None),  # GQA, seqlen_q < seqlen_k
    (2, 70, 33, 4, 1, 40, True, (-1, -1), 0.0, None),  # MQA, seqlen_q > seqlen_k: empty top rows
    (1, 129, 129, 2, 2, 128, False, (16, 0), 0.0, None),  # sliding window
    (1, 100, 80, 2, 2, 96, True, (10, -1), 0.0, None),  # causal + left window
    (1, 65, 90, 2, 1, 72, False, (-1, 5), 0.0, None),  # right window only
    (1, 50, 50, 2, 2, 64, False, (3, 7), 30.0, None),  # softcap
    (2, 40, 60, 4, 2, 64, True, (-1, -1), 0.0, "head"),  # ALiBi per head
    (2, 60, 40, 2, 2, 48, False, (8, 8), 20.0, "batch_head"),  # ALiBi per (batch, head) + softcap + window
    (1, 1, 1000, 2, 1, 64, True, (-1, -1), 0.0, None),  # one query against a long cache
    (1, 200, 1, 2, 2, 16, True, (-1, -1), 0.0, None),  # one key: every row but the last is empty
]


def alibi_for(kind, b, hq, rng):
    if kind is None:
        return None
    shape = (hq,) if kind == "head" else (b, hq)
    return torch.rand(shape, generator=rng) * 0.5


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("case", FEATURES, ids=lambda c: "x".join(map(str, c[:6])) + f"-c{int(c[6])}-w{c[7][0]}_{c[7][1]}-s{c[8]:g}-{c[9]}")
def test_features_match_reference(backend, rng, dtype, case):
    skip_emulated(backend)
    b, sq, sk, hq, hkv, d, causal, window, softcap, alibi = case
    q, k, v = make_qkv(rng, b, sq, sk, hq, hkv, d, dtype)
    slopes = alibi_for(alibi, b, hq, rng)
    opts = dict(causal=causal, window=window, softcap=softcap, alibi_slopes=slopes)
    out, lse = gk.flash_attention(q, k, v, return_lse=True, **opts)
    assert out.shape == q.shape and out.dtype == dtype and out.is_contiguous()
    assert lse.shape == (b, hq, sq) and lse.dtype == torch.float32
    check(q, k, v, out, lse, **opts)


@pytest.mark.parametrize("d", range(8, 257, 8))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d)[6:])
def test_every_head_dim(rng, d, dtype):
    q, k, v = make_qkv(rng, 1, 19, 37, 2, 1, d, dtype)
    out, lse = gk.flash_attention(q, k, v, causal=True, return_lse=True)
    check(q, k, v, out, lse, causal=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("sq,sk", [(1, 1), (7, 1), (1, 7), (129, 7), (7, 129), (1000, 1000)])
@pytest.mark.parametrize("causal", [False, True])
def test_odd_lengths(rng, dtype, sq, sk, causal):
    q, k, v = make_qkv(rng, 1, sq, sk, 2, 1, 64, dtype)
    out, lse = gk.flash_attention(q, k, v, causal=causal, return_lse=True)
    check(q, k, v, out, lse, causal=causal)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_rows_that_see_nothing(backend, rng, dtype):
    skip_emulated(backend)
    # causal with seqlen_q > seqlen_k: the first seqlen_q - seqlen_k rows see no key
    q, k, v = make_qkv(rng, 1, 90, 20, 2, 2, 64, dtype)
    out, lse = gk.flash_attention(q, k, v, causal=True, return_lse=True)
    assert (out[0, :70] == 0).all() and (lse[0, :, :70] == NEG_INF).all()
    assert torch.isfinite(out[0, 70:]).all() and torch.isfinite(lse[0, :, 70:]).all()
    check(q, k, v, out, lse, causal=True)
    # no keys at all
    out, lse = gk.flash_attention(q, k[:, :0], v[:, :0], return_lse=True)
    assert (out == 0).all() and (lse == NEG_INF).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("causal,window,alibi", [(False, (-1, -1), None), (True, (-1, -1), "head"), (True, (12, -1), "batch_head"), (False, (4, 9), None)])
def test_varlen_matches_reference(backend, rng, dtype, causal, window, alibi):
    skip_emulated(backend)
    lens_q, lens_k = [5, 0, 70, 1, 33], [9, 4, 64, 0, 100]  # an empty query set and an empty key set
    cu_q = torch.tensor([0] + lens_q, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    cu_k = torch.tensor([0] + lens_k, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    hq, hkv, d = 4, 2, 64
    q, k, v = make_qkv(rng, 0, int(cu_q[-1]), int(cu_k[-1]), hq, hkv, d, dtype, varlen=True)
    slopes = alibi_for(alibi, len(lens_q), hq, rng)
    opts = dict(causal=causal, window=window, alibi_slopes=slopes)
    out, lse = gk.flash_attention_varlen(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), return_lse=True, **opts)
    assert out.shape == q.shape and lse.shape == (hq, q.shape[0])
    check(q, k, v, out, lse, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, **opts)


def test_varlen_equals_dense_per_sequence(rng):
    lens = [17, 64, 3]
    cu = torch.tensor([0] + lens, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    q, k, v = make_qkv(rng, 0, int(cu[-1]), int(cu[-1]), 4, 2, 32, torch.float32, varlen=True)
    out, lse = gk.flash_attention_varlen(q, k, v, cu, cu, max(lens), max(lens), causal=True, return_lse=True)
    for b, (s, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        o1, l1 = gk.flash_attention(q[None, s:e], k[None, s:e], v[None, s:e], causal=True, return_lse=True)
        assert torch.equal(out[s:e], o1[0]) and torch.equal(lse[:, s:e], l1[0])


# ------------------------------------------------------------------ agreement with PyTorch SDPA
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("sq,sk,causal", [(77, 77, False), (77, 77, True), (40, 100, True), (100, 40, False)])
def test_agrees_with_sdpa(rng, dtype, sq, sk, causal):
    hq, hkv, d = 4, 2, 64
    q, k, v = make_qkv(rng, 2, sq, sk, hq, hkv, d, dtype)
    out = gk.flash_attention(q, k, v, causal=causal)
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    kt, vt = kt.repeat_interleave(hq // hkv, 1), vt.repeat_interleave(hq // hkv, 1)
    if causal and sq != sk:
        # SDPA's is_causal is top-left aligned; pass the bottom-right mask explicitly
        mask = torch.ones(sq, sk, dtype=torch.bool).tril(diagonal=sk - sq)
        sdpa = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask)
    else:
        sdpa = F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)
    want, _ = ref_mod.flash_attention(q, k, v, causal=causal)
    assert_close("out", out, want, baseline=sdpa.transpose(1, 2))


# ------------------------------------------------------------------ layouts
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_strided_inputs(backend, rng, dtype):
    skip_emulated(backend)
    # q: a head slice of a fused qkv projection; k, v: (b, h, s, d) storage seen as (b, s, h, d)
    qkv = torch.randn(2, 50, 3 * 4, 64, generator=rng).to(dtype)
    q = qkv[:, :, 0:4]
    k = torch.randn(2, 2, 70, 64, generator=rng).to(dtype).transpose(1, 2)
    v = torch.randn(2, 2, 70, 64, generator=rng).to(dtype).transpose(1, 2)
    assert not q.is_contiguous() and not k.is_contiguous()
    out, lse = gk.flash_attention(q, k, v, causal=True, return_lse=True)
    check(q, k, v, out, lse, causal=True)


def test_strided_varlen(rng):
    qkv = torch.randn(40, 3, 4, 32, generator=rng)
    q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
    cu = torch.tensor([0, 15, 40], dtype=torch.int32)
    out, lse = gk.flash_attention_varlen(q, k, v, cu, cu, 25, 25, causal=True, return_lse=True)
    check(q, k, v, out, lse, causal=True, cu_seqlens_q=cu, cu_seqlens_k=cu)


def test_softmax_scale_and_no_lse(rng):
    q, k, v = make_qkv(rng, 1, 20, 30, 2, 2, 64, torch.float32)
    out = gk.flash_attention(q, k, v, softmax_scale=0.3)
    assert isinstance(out, torch.Tensor)
    want, _ = ref_mod.flash_attention(q, k, v, softmax_scale=0.3)
    base, _ = ref_mod.flash_attention(q, k, v, softmax_scale=0.3, dtype=torch.float32)
    assert_close("out", out, want, baseline=base)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("window", [(-1, -1), (40, -1)])
def test_thread_counts_agree(rng, dtype, window):
    """Work units (heads x query tiles sharing K / V copies) are shaped by the thread count; the
    result must not depend on it, sliding windows (query tiles with different first keys) included."""
    q, k, v = make_qkv(rng, 1, 600, 600, 4, 2, 64, dtype)  # 1 thread: 4 query tiles per unit, 2: 3
    results = []
    for threads in (1, 2):
        gk.set_num_threads(threads)
        try:
            results.append(gk.flash_attention(q, k, v, causal=True, window=window, return_lse=True))
        finally:
            gk.set_num_threads(None)
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("causal,window,softcap", [(True, (-1, -1), 0.0), (False, (-1, -1), 0.0), (True, (50, -1), 15.0)])
def test_gqa_units_equal_per_head_calls(rng, dtype, causal, window, softcap):
    """A CPU work unit computes several query heads of one kv head on shared K / V tile copies
    (as many as fit its scratch budget). Each head's result must be exactly what that head alone
    gives (the same micro-kernels in the same order), ALiBi slope per head included."""
    b, s, hq, hkv, d = 2, 300, 8, 2, 64
    q, k, v = make_qkv(rng, b, s, s, hq, hkv, d, dtype)
    slopes = torch.rand(b, hq, generator=rng) * 0.3
    kw = dict(causal=causal, window=window, softcap=softcap, return_lse=True)
    out, lse = gk.flash_attention(q, k, v, alibi_slopes=slopes, **kw)
    g = hq // hkv
    for h in range(hq):
        kv = slice(h // g, h // g + 1)
        o1, l1 = gk.flash_attention(q[:, :, h : h + 1], k[:, :, kv], v[:, :, kv], alibi_slopes=slopes[:, h : h + 1].contiguous(), **kw)
        assert torch.equal(out[:, :, h : h + 1], o1), f"head {h}"
        assert torch.equal(lse[:, h : h + 1], l1), f"head {h}"


# The CPU kernel tiles queries by 128, or by 64 for short problems (masked up to 1024 queries, any
# up to 512). Lengths around both tile sizes and key-tile (64) boundaries, on both paths: short
# problems take the 64-query path; above 1024 queries every problem takes the 128-query path.
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("sq", [63, 64, 65, 127, 128, 129, 191, 513])
@pytest.mark.parametrize("causal,window", [(False, (-1, -1)), (True, (-1, -1)), (False, (40, 70))])
def test_short_query_tiles(backend, rng, dtype, sq, causal, window):
    skip_emulated(backend)
    q, k, v = make_qkv(rng, 1, sq, sq + 1, 3, 1, 64, dtype)
    out, lse = gk.flash_attention(q, k, v, causal=causal, window=window, return_lse=True)
    check(q, k, v, out, lse, causal=causal, window=window)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("sq,sk", [(1025, 1025), (1089, 1000), (1151, 1216)])
@pytest.mark.parametrize("causal,window", [(False, (-1, -1)), (True, (-1, -1)), (True, (100, -1))])
def test_long_query_tiles(backend, rng, dtype, sq, sk, causal, window):
    skip_emulated(backend)
    q, k, v = make_qkv(rng, 1, sq, sk, 2, 1, 32, dtype)
    out, lse = gk.flash_attention(q, k, v, causal=causal, window=window, return_lse=True)
    check(q, k, v, out, lse, causal=causal, window=window)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("causal", [False, True])
def test_both_query_tiles_on_the_same_data(rng, dtype, causal):
    """varlen picks the tile from max_seqlen_q, so one ragged batch (lengths around 64 and 128)
    runs through the short and the long tile path; both must match the reference."""
    lens = [1, 63, 64, 65, 127, 128, 129, 200]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    q, k, v = make_qkv(rng, 1, int(cu[-1]), int(cu[-1]), 4, 2, 48, dtype, varlen=True)
    for max_seqlen in (max(lens), 4096):  # short tiles, then 128-query tiles
        out, lse = gk.flash_attention_varlen(q, k, v, cu, cu, max_seqlen, max_seqlen, causal=causal, return_lse=True)
        for b in range(len(lens)):
            s, e = int(cu[b]), int(cu[b + 1])
            check(q[None, s:e], k[None, s:e], v[None, s:e], out[None, s:e], lse[:, s:e][None], causal=causal)


def test_scratch_regrows_across_head_dims_and_threads(rng):
    """The per-call scratch (allocated before the parallel region) must follow the head dim and
    the thread count from call to call."""
    for threads, d in [(1, 16), (2, 256), (2, 64), (1, 256), (2, 8)]:
        q, k, v = make_qkv(rng, 1, 300, 300, 4, 2, d, torch.float32)
        gk.set_num_threads(threads)
        try:
            out, lse = gk.flash_attention(q, k, v, causal=True, return_lse=True)
        finally:
            gk.set_num_threads(None)
        check(q, k, v, out, lse, causal=True)
