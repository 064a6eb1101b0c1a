"""flash_attention / flash_attention_varlen as torch ops: opcheck, torch.compile, and bad input
rejected with an error naming the argument before anything reaches native code."""
from __future__ import annotations

import pytest
import torch

import genkernels as gk
from genkernels import reference as ref_mod
from genkernels.testing import assert_close


def qkv(b=1, sq=9, sk=11, hq=4, hkv=2, d=32, dtype=torch.float32):
    return (torch.randn(b, sq, hq, d).to(dtype), torch.randn(b, sk, hkv, d).to(dtype), torch.randn(b, sk, hkv, d).to(dtype))


def varlen_inputs(dtype=torch.float32):
    cu_q = torch.tensor([0, 3, 10], dtype=torch.int32)
    cu_k = torch.tensor([0, 5, 9], dtype=torch.int32)
    q = torch.randn(10, 4, 32).to(dtype)
    k, v = torch.randn(9, 2, 32).to(dtype), torch.randn(9, 2, 32).to(dtype)
    return q, k, v, cu_q, cu_k


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d)[6:])
def test_opcheck_dense(dtype):
    q, k, v = qkv(dtype=dtype)
    slopes = torch.rand(4)
    for args in [
        (q, k, v, False, -1, -1, 0.2, 0.0, None, True),
        (q, k, v, True, 4, -1, 0.2, 10.0, slopes, False),
    ]:
        torch.library.opcheck(torch.ops.genkernels.flash_attention.default, args)


def test_opcheck_varlen():
    q, k, v, cu_q, cu_k = varlen_inputs()
    args = (q, k, v, cu_q, cu_k, 7, 5, True, -1, -1, 0.2, 0.0, torch.rand(2, 4), True)
    torch.library.opcheck(torch.ops.genkernels.flash_attention_varlen.default, args)


def test_torch_compile():
    q, k, v = qkv(b=2, sq=17, sk=23)

    def attend(q, k, v):
        out, lse = gk.flash_attention(q * 2, k, v, causal=True, window=(8, -1), return_lse=True)
        return out + 1, lse

    compiled = torch.compile(attend, fullgraph=True, backend="aot_eager")
    out, lse = compiled(q, k, v)
    want_out, want_lse = attend(q, k, v)
    torch.testing.assert_close(out, want_out, rtol=0, atol=0)
    torch.testing.assert_close(lse, want_lse, rtol=0, atol=0)


def test_torch_compile_inductor_varlen():
    q, k, v, cu_q, cu_k = varlen_inputs()
    fn = torch.compile(lambda *a: gk.flash_attention_varlen(*a, 7, 5, causal=True), fullgraph=True)
    out = fn(q, k, v, cu_q, cu_k)
    want, _ = ref_mod.flash_attention(q, k, v, causal=True, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    base, _ = ref_mod.flash_attention(q, k, v, causal=True, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, dtype=torch.float32)
    assert_close("out", out, want, baseline=base)


def test_cuda_path_takes_half_precision_only():
    """The CUDA kernel (and its emulation) takes float16 / bfloat16: float32 is refused up front."""
    from genkernels import testing

    if not testing.has_emulation():
        pytest.skip("built without CUDA emulation")
    q, k, v = qkv()
    with testing.emulate_cuda():
        with pytest.raises(TypeError, match="float16 or bfloat16"):
            gk.flash_attention(q, k, v)


# ------------------------------------------------------------------ bad input
def _dense_bad_cases():
    q, k, v = qkv()
    return [
        ("q not a tensor", lambda: gk.flash_attention(q.tolist(), k, v), TypeError, "q must be a torch.Tensor"),
        ("q 3-d", lambda: gk.flash_attention(q[0], k, v), ValueError, "q must have 4 dimensions"),
        ("mismatched heads", lambda: gk.flash_attention(q[:, :, :3], k, v), ValueError, "not a multiple of the 2 heads"),
        ("k/v heads differ", lambda: gk.flash_attention(q, k, v[:, :, :1]), ValueError, "v has 1 heads"),
        ("head dim not /8", lambda: gk.flash_attention(q[..., :12], k[..., :12], v[..., :12]), ValueError, "head_dim 12"),
        ("head dim > 256", lambda: gk.flash_attention(*qkv(d=264)), ValueError, "head_dim 264"),
        ("k head dim differs", lambda: gk.flash_attention(q, k[..., :24], v), ValueError, "k has head_dim 24"),
        ("int dtype", lambda: gk.flash_attention(q.int(), k, v), TypeError, "q must have dtype"),
        ("mixed dtypes", lambda: gk.flash_attention(q, k.bfloat16(), v), TypeError, "k has dtype"),
        ("fp64", lambda: gk.flash_attention(q.double(), k.double(), v.double()), TypeError, "q must have dtype"),
        ("meta device", lambda: gk.flash_attention(q, k.to("meta"), v), ValueError, "k is on"),
        ("batch differs", lambda: gk.flash_attention(q, k.expand(2, -1, -1, -1), v), ValueError, "same batch size"),
        ("k/v seqlen differ", lambda: gk.flash_attention(q, k, v[:, :5]), ValueError, "v has seqlen 5"),
        ("last dim strided", lambda: gk.flash_attention(q, torch.randn(1, 11, 2, 64)[..., ::2], v), ValueError, "k must have a contiguous last"),
        ("window < -1", lambda: gk.flash_attention(q, k, v, window=(-2, 0)), ValueError, "window left must be >= -1"),
        ("window right < -1", lambda: gk.flash_attention(q, k, v, window=(3, -5)), ValueError, "window right must be >= -1"),
        ("window not a pair", lambda: gk.flash_attention(q, k, v, window=(3,)), TypeError, "window must be"),
        ("window float", lambda: gk.flash_attention(q, k, v, window=(3.0, 1)), TypeError, "window left must be an int"),
        ("negative softcap", lambda: gk.flash_attention(q, k, v, softcap=-1.0), ValueError, "softcap must be a finite float >= 0"),
        ("infinite softcap", lambda: gk.flash_attention(q, k, v, softcap=float("inf")), ValueError, "softcap must be a finite"),
        ("NaN softcap", lambda: gk.flash_attention(q, k, v, softcap=float("nan")), ValueError, "softcap must be a finite"),
        ("NaN scale", lambda: gk.flash_attention(q, k, v, softmax_scale=float("nan")), ValueError, "softmax_scale must be a finite"),
        ("infinite scale", lambda: gk.flash_attention(q, k, v, softmax_scale=float("inf")), ValueError, "softmax_scale must be a finite"),
        ("scale not a number", lambda: gk.flash_attention(q, k, v, softmax_scale="0.1"), TypeError, "softmax_scale must be a finite"),
        ("causal a string", lambda: gk.flash_attention(q, k, v, causal="yes"), TypeError, "causal must be a bool"),
        ("return_lse None", lambda: gk.flash_attention(q, k, v, return_lse=None), TypeError, "return_lse must be a bool"),
        ("softcap a string", lambda: gk.flash_attention(q, k, v, softcap="1"), TypeError, "softcap must be a number"),
        ("alibi shape", lambda: gk.flash_attention(q, k, v, alibi_slopes=torch.rand(3)), ValueError, "alibi_slopes must have shape"),
        ("alibi dtype", lambda: gk.flash_attention(q, k, v, alibi_slopes=torch.rand(4).double()), TypeError, "alibi_slopes must have dtype"),
    ]


def test_varlen_accepts_numpy_integers():
    import numpy as np

    q, k, v, cu_q, cu_k = varlen_inputs()
    want = gk.flash_attention_varlen(q, k, v, cu_q, cu_k, 7, 5)
    assert torch.equal(gk.flash_attention_varlen(q, k, v, cu_q, cu_k, np.int64(7), np.int32(5)), want)


def _varlen_bad_cases():
    q, k, v, cu_q, cu_k = varlen_inputs()
    call = gk.flash_attention_varlen
    i32 = lambda xs: torch.tensor(xs, dtype=torch.int32)  # noqa: E731
    return [
        ("cu int64", lambda: call(q, k, v, cu_q.long(), cu_k, 7, 5), TypeError, "cu_seqlens_q must have dtype int32"),
        ("cu 2-d", lambda: call(q, k, v, cu_q, cu_k[None], 7, 5), ValueError, "cu_seqlens_k must have 1 dimensions"),
        ("cu lengths differ", lambda: call(q, k, v, cu_q, i32([0, 9]), 7, 5), ValueError, "cu_seqlens_k has 2 entries"),
        ("cu not increasing", lambda: call(q, k, v, i32([0, 6, 4]), cu_k, 7, 5), ValueError, "cu_seqlens_q must be non-decreasing"),
        ("cu not starting at 0", lambda: call(q, k, v, cu_q, i32([1, 5, 9]), 7, 5), ValueError, r"cu_seqlens_k\[0\] must be 0"),
        ("cu exceeds tensor", lambda: call(q, k, v, cu_q, i32([0, 5, 12]), 7, 7), ValueError, "exceeds the 9 tokens"),
        ("cu exceeds q", lambda: call(q, k, v, i32([0, 3, 11]), cu_k, 8, 5), ValueError, r"cu_seqlens_q\[-1\] = 11 exceeds"),
        ("max_seqlen too small", lambda: call(q, k, v, cu_q, cu_k, 6, 5), ValueError, "more than max_seqlen_q = 6"),
        ("max_seqlen negative", lambda: call(q, k, v, cu_q, cu_k, -1, 5), ValueError, "max_seqlen_q must be >= 0"),
        ("max_seqlen float", lambda: call(q, k, v, cu_q, cu_k, 7.0, 5), TypeError, "max_seqlen_q must be an int"),
        ("q 4-d", lambda: call(q[None], k, v, cu_q, cu_k, 7, 5), ValueError, "q must have 3 dimensions"),
        ("alibi batch", lambda: call(q, k, v, cu_q, cu_k, 7, 5, alibi_slopes=torch.rand(3, 4)), ValueError, r"\(2, 4\)"),
        ("window", lambda: call(q, k, v, cu_q, cu_k, 7, 5, window=(-3, -1)), ValueError, "window left"),
        ("causal a string", lambda: call(q, k, v, cu_q, cu_k, 7, 5, causal="no"), TypeError, "causal must be a bool"),
        ("softcap inf", lambda: call(q, k, v, cu_q, cu_k, 7, 5, softcap=float("inf")), ValueError, "softcap must be a finite"),
        ("scale NaN", lambda: call(q, k, v, cu_q, cu_k, 7, 5, softmax_scale=float("nan")), ValueError, "softmax_scale must be a finite"),
    ]


@pytest.mark.parametrize("case", _dense_bad_cases() + _varlen_bad_cases(), ids=lambda c: c[0])
def test_bad_input(case):
    _, fn, exc, match = case
    with pytest.raises(exc, match=match):
        fn()
