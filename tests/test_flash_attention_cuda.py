"""The CUDA flash-attention kernel (csrc/cuda/flash_attention.cuh) run through the CUDA-on-CPU
emulator on small shapes, against the float64 reference with the tolerance rule: every compiled
(head dim, dtype), causal or not, windows, GQA/MQA, varlen, softcap, ALiBi, LSE, seqlen_q != seqlen_k,
lengths off the tile grid (1, 7, 65, 129), rows that see no key; and agreement with the CPU path."""
from __future__ import annotations

import pytest
import torch

import genkernels as gk
from genkernels import reference as ref
from genkernels.testing import assert_close, emulate_cuda, has_emulation
from genkernels.tools.instantiations import FLASH_HEAD_DIMS

pytestmark = [pytest.mark.emulated, pytest.mark.skipif(not has_emulation(), reason="built without emulation")]

DTYPES = [torch.float16, torch.bfloat16]


def randn(*shape, dtype, g):
    return torch.randn(*shape, generator=g).to(dtype)


def check(q, k, v, **kw):
    """Emulated kernel vs the float64 reference; PyTorch in q's dtype sets the tolerance."""
    with emulate_cuda():
        out, lse = gk.flash_attention(q, k, v, return_lse=True, **kw)
    want, want_lse = ref.flash_attention(q, k, v, **kw)
    base, base_lse = ref.flash_attention(q, k, v, dtype=q.dtype, **kw)
    assert_close("out", out, want, base)
    assert_close("lse", lse, want_lse, base_lse.float())
    return out, lse


def qkv(batch, sq, sk, hq, hkv, d, dtype, g):
    return randn(batch, sq, hq, d, dtype=dtype, g=g), randn(batch, sk, hkv, d, dtype=dtype, g=g), \
        randn(batch, sk, hkv, d, dtype=dtype, g=g)  # fmt: skip


@pytest.mark.parametrize("head_dim", FLASH_HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
def test_head_dims(head_dim, dtype, causal):
    g = torch.Generator().manual_seed(head_dim * 10 + causal)
    # 65 queries: two query blocks, the second with one row; 70 keys: a partial last key tile
    check(*qkv(1, 65, 70, 2, 1, head_dim, dtype, g), causal=causal)


@pytest.mark.parametrize("sq,sk", [(1, 1), (7, 7), (1, 129), (129, 1), (65, 129), (129, 65), (20, 7)])
@pytest.mark.parametrize("causal", [False, True])
def test_lengths(sq, sk, causal):
    # seqlen_q > seqlen_k with causal leaves the first rows with no key (output 0, lse -inf)
    g = torch.Generator().manual_seed(sq * 1000 + sk + causal)
    check(*qkv(2, sq, sk, 2, 2, 64, torch.bfloat16, g), causal=causal)


@pytest.mark.parametrize(
    "window,causal",
    [((5, 3), False), ((0, 0), False), ((16, -1), True), ((-1, 2), False), ((70, 0), False), ((3, 200), True),
     ((150, 10), False)],  # the last leaves interior key tiles that every row of a block sees: unmasked
)
def test_windows(window, causal):
    g = torch.Generator().manual_seed(window[0] * 7 + window[1] + causal)
    check(*qkv(1, 129, 100, 2, 1, 32, torch.float16, g), window=window, causal=causal)
    check(*qkv(1, 40, 140, 1, 1, 64, torch.bfloat16, g), window=window, causal=causal)
    check(*qkv(1, 300, 290, 1, 1, 32, torch.bfloat16, g), window=window, causal=causal)


@pytest.mark.parametrize("hq,hkv", [(8, 2), (4, 1)])
def test_gqa(hq, hkv):
    g = torch.Generator().manual_seed(hq * 10 + hkv)
    check(*qkv(2, 33, 65, hq, hkv, 64, torch.float16, g), causal=True)


@pytest.mark.parametrize("alibi_2d", [False, True])
def test_softcap_alibi_scale(alibi_2d):
    g = torch.Generator().manual_seed(5 + alibi_2d)
    q, k, v = qkv(2, 70, 90, 4, 2, 96, torch.bfloat16, g)
    q = q * 4  # scores large enough for the softcap to matter
    slopes = torch.rand((2, 4) if alibi_2d else (4,), generator=g)
    check(q, k, v, softcap=3.0)
    check(q, k, v, alibi_slopes=slopes, causal=True)
    check(q, k, v, softcap=5.0, alibi_slopes=slopes, window=(20, 10), softmax_scale=0.3)
    check(q, k, v, softmax_scale=-0.2)  # negative scale: the kernel's general score path


def test_varlen():
    g = torch.Generator().manual_seed(17)
    lens_q, lens_k = [1, 0, 65, 7, 129], [129, 3, 65, 0, 100]
    cu_q = torch.tensor([0] + torch.tensor(lens_q).cumsum(0).tolist(), dtype=torch.int32)
    cu_k = torch.tensor([0] + torch.tensor(lens_k).cumsum(0).tolist(), dtype=torch.int32)
    q = randn(sum(lens_q), 4, 64, dtype=torch.float16, g=g)
    k = randn(sum(lens_k), 2, 64, dtype=torch.float16, g=g)
    v = randn(sum(lens_k), 2, 64, dtype=torch.float16, g=g)
    for kw in (dict(), dict(causal=True), dict(window=(8, 4), alibi_slopes=torch.rand(5, 4, generator=g))):
        with emulate_cuda():
            out, lse = gk.flash_attention_varlen(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), return_lse=True, **kw)
        want, want_lse = ref.flash_attention(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, **kw)
        base, base_lse = ref.flash_attention(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, dtype=q.dtype, **kw)
        assert_close(f"varlen out {kw}", out, want, base)
        assert_close(f"varlen lse {kw}", lse, want_lse, base_lse.float())


def test_strided_inputs():
    # q, k, v as views of one packed qkv tensor (batch, seq, 3, heads, head_dim): no copies
    g = torch.Generator().manual_seed(3)
    qkv_packed = randn(2, 50, 3, 2, 64, dtype=torch.bfloat16, g=g)
    q, k, v = qkv_packed.unbind(2)
    assert not q.is_contiguous()
    check(q, k, v, causal=True)


def test_empty_keys():
    g = torch.Generator().manual_seed(4)
    out, lse = check(*qkv(1, 9, 0, 2, 2, 32, torch.float16, g))
    assert torch.equal(out, torch.zeros_like(out)) and bool((lse == float("-inf")).all())


@pytest.mark.parametrize("dtype", DTYPES)
def test_agrees_with_cpu_path(dtype):
    g = torch.Generator().manual_seed(11)
    q, k, v = qkv(2, 70, 129, 4, 2, 128, dtype, g)
    kw = dict(causal=True, window=(64, -1), softcap=8.0)
    with emulate_cuda():
        out, lse = gk.flash_attention(q, k, v, return_lse=True, **kw)
    cpu, cpu_lse = gk.flash_attention(q, k, v, return_lse=True, **kw)
    # the CPU result stands in for the reference: the two may differ by PyTorch's own error
    base, base_lse = ref.flash_attention(q, k, v, dtype=dtype, **kw)
    assert_close("emulated vs cpu", out, cpu.double(), base)
    assert_close("emulated vs cpu lse", lse, cpu_lse.double(), base_lse.float())


def test_unsupported_layouts_are_clear_errors():
    g = torch.Generator().manual_seed(1)
    with emulate_cuda(), pytest.raises(ValueError, match="head_dim"):
        gk.flash_attention(*qkv(1, 4, 4, 1, 1, 80, torch.float16, g))
    q, k, v = qkv(1, 4, 4, 1, 1, 72, torch.float16, g)  # slicing 64 of 72: rows of 144 bytes, not 16-aligned
    with emulate_cuda(), pytest.raises(ValueError, match="16-byte"):
        gk.flash_attention(q[..., 4:68], k[..., :64], v[..., :64])
    with emulate_cuda(), pytest.raises(TypeError, match="float16 or bfloat16"):
        gk.flash_attention(*qkv(1, 4, 4, 1, 1, 64, torch.float32, g))
