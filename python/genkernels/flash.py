"""Flash attention forward (prefill): exact softmax attention without materialising the score
matrix, with the FlashAttention-2 feature set and semantics.

Layout ``(batch, seqlen, heads, head_dim)``; varlen packs the sequences as ``(total, heads,
head_dim)`` with int32 ``cu_seqlens`` offsets. GQA/MQA when ``heads_q % heads_kv == 0``.
``causal=True`` is aligned to the bottom-right corner when ``seqlen_q != seqlen_k`` (query ``i``
sees keys up to ``i + seqlen_k - seqlen_q``); ``window=(left, right)`` is inclusive with -1 for
unbounded, and causal sets ``right = 0``. Scores are ``softmax_scale * q.k`` (default
``head_dim ** -0.5``), then ``softcap * tanh(s / softcap)`` when ``softcap > 0``, then minus
``slope * |i + seqlen_k - seqlen_q - j|`` with ALiBi. A query that sees no key gets output 0 and
log-sum-exp ``-inf``. The LSE is the natural log, float32.

Inputs may be strided; only the head_dim axis must be contiguous (nothing is copied). Outputs
are new contiguous tensors. CPU: float32, float16, bfloat16, head_dim any multiple of 8 up to
256. CUDA: float16 and bfloat16.
"""
from __future__ import annotations

from typing import Sequence

import torch

from . import _native
from ._checks import (FLOAT_DTYPES, check_flag, check_int, check_number, check_same_device, check_same_dtype,
                      check_softcap, check_softmax_scale, check_tensor, require_tensors)
from .tools.instantiations import FLASH_HEAD_DIMS

MAX_HEAD_DIM = 256
CUDA_DTYPES = (torch.float16, torch.bfloat16)


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    window: Sequence[int] = (-1, -1),
    softmax_scale: float | None = None,
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    return_lse: bool = False,
):
    """Attention of ``q (batch, seqlen_q, heads_q, head_dim)`` over ``k, v (batch, seqlen_k,
    heads_kv, head_dim)``.

    Args:
        causal: mask keys after the query's position (bottom-right aligned).
        window: ``(left, right)`` keys visible on each side of the query's position, -1 unbounded.
        softmax_scale: defaults to ``head_dim ** -0.5``.
        softcap: ``> 0`` applies ``softcap * tanh(s / softcap)`` to the scaled scores.
        alibi_slopes: float32 ``(heads_q,)`` or ``(batch, heads_q)``.
        return_lse: also return the log-sum-exp ``(batch, heads_q, seqlen_q)`` float32.

    Returns:
        ``out`` contiguous ``(batch, seqlen_q, heads_q, head_dim)`` in the input dtype, or
        ``(out, lse)`` with ``return_lse``.
    """
    require_tensors(q=q, k=k, v=v)
    wl, wr = _window(window)
    out, lse = torch.ops.genkernels.flash_attention(
        q, k, v, check_flag("causal", causal), wl, wr, _scale(softmax_scale, q), check_number("softcap", softcap),
        alibi_slopes, check_flag("return_lse", return_lse),
    )  # fmt: skip
    return (out, lse) if return_lse else out


def flash_attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    causal: bool = False,
    window: Sequence[int] = (-1, -1),
    softmax_scale: float | None = None,
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    return_lse: bool = False,
):
    """Flash attention over a packed ragged batch: ``q (total_q, heads_q, head_dim)``, ``k, v
    (total_k, heads_kv, head_dim)``; sequence ``b`` owns tokens ``cu_seqlens_q[b] :
    cu_seqlens_q[b + 1]`` of q (likewise for k, v). ``cu_seqlens_*`` are int32 ``(batch + 1,)``,
    starting at 0 and non-decreasing; ``max_seqlen_*`` bound the sequence lengths. Options as in
    :func:`flash_attention`; ALiBi slopes ``(heads_q,)`` or ``(batch, heads_q)``.

    Returns ``out (total_q, heads_q, head_dim)``, or ``(out, lse)`` with lse ``(heads_q, total_q)``
    float32 (FlashAttention-2's varlen layout).
    """
    require_tensors(q=q, k=k, v=v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k)
    wl, wr = _window(window)
    out, lse = torch.ops.genkernels.flash_attention_varlen(
        q, k, v, cu_seqlens_q, cu_seqlens_k, _int("max_seqlen_q", max_seqlen_q), _int("max_seqlen_k", max_seqlen_k),
        check_flag("causal", causal), wl, wr, _scale(softmax_scale, q), check_number("softcap", softcap), alibi_slopes,
        check_flag("return_lse", return_lse),
    )  # fmt: skip
    return (out, lse) if return_lse else out


# ------------------------------------------------------------------ argument checks
def _int(name: str, x: object) -> int:
    x = check_int(name, x)  # int or NumPy integer
    if x < 0:
        raise ValueError(f"{name} must be >= 0, got {x}")
    return x


def _window(window: Sequence[int]) -> tuple[int, int]:
    if not isinstance(window, (tuple, list)) or len(window) != 2:
        raise TypeError(f"window must be a (left, right) pair of ints, got {window!r}")
    for side, x in zip(("left", "right"), window):
        if isinstance(x, bool) or not isinstance(x, int):
            raise TypeError(f"window {side} must be an int, got {type(x).__name__}")
        if x < -1:
            raise ValueError(f"window {side} must be >= -1 (-1: unbounded), got {x}")
    return int(window[0]), int(window[1])


def _scale(softmax_scale: float | None, q: torch.Tensor) -> float:
    if softmax_scale is None:
        return float(q.shape[-1]) ** -0.5 if q.dim() > 0 and q.shape[-1] > 0 else 1.0
    return check_softmax_scale(softmax_scale)


def _check_common(q, k, v, window_left, window_right, softcap, alibi_slopes, batch, ndim) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, ndim=ndim, dtypes=FLOAT_DTYPES, last_dim_contiguous=True)
    check_same_dtype(q=q, k=k, v=v)
    check_same_device(q=q, k=k, v=v, alibi_slopes=alibi_slopes)
    d = q.shape[-1]
    if d % 8 != 0 or not 8 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"q has head_dim {d}; expected a multiple of 8 in [8, {MAX_HEAD_DIM}]")
    for name, t in (("k", k), ("v", v)):
        if t.shape[-1] != d:
            raise ValueError(f"{name} has head_dim {t.shape[-1]} but q has {d}; they must match")
    hq, hkv = q.shape[-2], k.shape[-2]
    if v.shape[-2] != hkv:
        raise ValueError(f"v has {v.shape[-2]} heads but k has {hkv}; they must match")
    if hkv < 1 or hq % hkv != 0:
        raise ValueError(f"q has {hq} heads, not a multiple of the {hkv} heads of k and v (GQA needs heads_q % heads_kv == 0)")
    if window_left < -1 or window_right < -1:
        raise ValueError(f"window must be >= -1 on both sides (-1: unbounded), got ({window_left}, {window_right})")
    check_softcap(softcap)
    if alibi_slopes is not None:
        check_tensor("alibi_slopes", alibi_slopes, dtypes=(torch.float32,), last_dim_contiguous=True)
        if tuple(alibi_slopes.shape) not in ((hq,), (batch, hq)):
            raise ValueError(f"alibi_slopes must have shape ({hq},) or ({batch}, {hq}), got {tuple(alibi_slopes.shape)}")
    if _native.device_code(q) != _native.DEVICE_CPU and q.dtype not in CUDA_DTYPES:
        raise TypeError(f"q has dtype {q.dtype}; the CUDA kernel takes float16 or bfloat16")
    if _native.device_code(q) != _native.DEVICE_CPU and d not in FLASH_HEAD_DIMS:
        raise ValueError(f"head_dim {d} has no CUDA flash-attention kernel; supported: {FLASH_HEAD_DIMS}")


def _validate_dense(q, k, v, wl, wr, softcap, alibi_slopes) -> None:
    _check_common(q, k, v, wl, wr, softcap, alibi_slopes, q.shape[0] if q.dim() == 4 else 0, 4)
    if k.shape[0] != q.shape[0] or v.shape[0] != q.shape[0]:
        raise ValueError(f"q, k and v must have the same batch size, got {q.shape[0]}, {k.shape[0]}, {v.shape[0]}")
    if v.shape[1] != k.shape[1]:
        raise ValueError(f"v has seqlen {v.shape[1]} but k has {k.shape[1]}; they must match")


def _validate_varlen(q, k, v, cu_q, cu_k, max_q, max_k, wl, wr, softcap, alibi_slopes) -> None:
    for name, t in (("cu_seqlens_q", cu_q), ("cu_seqlens_k", cu_k)):
        check_tensor(name, t, ndim=1, dtypes=(torch.int32,), contiguous=True)
        if t.shape[0] < 1:
            raise ValueError(f"{name} must have batch + 1 >= 1 entries, got shape {tuple(t.shape)}")
    if cu_k.shape[0] != cu_q.shape[0]:
        raise ValueError(
            f"cu_seqlens_k has {cu_k.shape[0]} entries but cu_seqlens_q has {cu_q.shape[0]}; both must be batch + 1"
        )
    _check_common(q, k, v, wl, wr, softcap, alibi_slopes, cu_q.shape[0] - 1, 3)
    check_same_device(q=q, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    if v.shape[0] != k.shape[0]:
        raise ValueError(f"v has {v.shape[0]} tokens but k has {k.shape[0]}; they must match")
    for name, x in (("max_seqlen_q", max_q), ("max_seqlen_k", max_k)):
        if x < 0:
            raise ValueError(f"{name} must be >= 0, got {x}")


def _check_cuda_layout(**tensors) -> None:
    # the CUDA kernel moves whole 16-byte chunks with cp.async (csrc/cuda/flash_attention.cuh)
    for name, t in tensors.items():
        chunk = 16 // t.element_size()
        if t.data_ptr() % 16 or any(s % chunk for s in t.stride()[:-1]):
            raise ValueError(f"{name} must be 16-byte aligned with strides that are multiples of {chunk} elements on CUDA")


# ------------------------------------------------------------------ implementation
def _lse_output(shape, want: bool, device) -> torch.Tensor:
    return _native.new_output(shape if want else (0,), torch.float32, device)


def _launch(q, k, v, out, lse, cu_q, cu_k, alibi, batch, sq, sk, dense, causal, wl, wr, scale, softcap):
    if dense:
        qs, ks, vs, os = q.stride()[:3], k.stride()[:3], v.stride()[:3], out.stride()[:3]
        ls = lse.stride() if lse.numel() else (0, 0, 0)
    else:  # varlen: batch stride 0, tokens indexed globally through cu_seqlens
        qs, ks, vs, os = (0, *q.stride()[:2]), (0, *k.stride()[:2]), (0, *v.stride()[:2]), (0, *out.stride()[:2])
        ls = (0, *lse.stride()) if lse.numel() else (0, 0, 0)
    alibi_bstride = alibi.stride(0) if alibi is not None and alibi.dim() == 2 else 0
    if _native.device_code(q) != _native.DEVICE_CPU:
        _check_cuda_layout(q=q, k=k, v=v)
    _native._C.flash_attention(
        _native.device_code(q), _native.DTYPE_CODE[q.dtype],
        q.data_ptr(), *qs, k.data_ptr(), *ks, v.data_ptr(), *vs, out.data_ptr(), *os,
        lse.data_ptr() if lse.numel() else 0, *ls,
        _native.ptr(cu_q), _native.ptr(cu_k), q.shape[0], k.shape[0], _native.ptr(alibi), alibi_bstride,
        batch, sq, sk, q.shape[-2], k.shape[-2], q.shape[-1], scale, softcap, causal, wl, wr,
        _native.stream_of(q), _native.num_threads(),
    )  # fmt: skip


def dense_impl(q, k, v, causal, window_left, window_right, softmax_scale, softcap, alibi_slopes, return_lse):
    _validate_dense(q, k, v, window_left, window_right, softcap, alibi_slopes)
    b, sq, hq, d = q.shape
    out = _native.new_output((b, sq, hq, d), q.dtype, q.device)
    lse = _lse_output((b, hq, sq), return_lse, q.device)
    _launch(q, k, v, out, lse, None, None, alibi_slopes, b, sq, k.shape[1], True,
            causal, window_left, window_right, softmax_scale, softcap)  # fmt: skip
    return out, lse


def dense_fake(q, k, v, causal, window_left, window_right, softmax_scale, softcap, alibi_slopes, return_lse):
    _validate_dense(q, k, v, window_left, window_right, softcap, alibi_slopes)
    b, sq, hq, d = q.shape
    return q.new_empty((b, sq, hq, d)), q.new_empty((b, hq, sq) if return_lse else (0,), dtype=torch.float32)


def varlen_impl(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, window_left, window_right,
                softmax_scale, softcap, alibi_slopes, return_lse):  # fmt: skip
    _validate_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, window_left, window_right,
                     softcap, alibi_slopes)  # fmt: skip
    total_q, hq, d = q.shape
    out = _native.new_output((total_q, hq, d), q.dtype, q.device)
    lse = _lse_output((hq, total_q), return_lse, q.device)
    _launch(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, alibi_slopes, cu_seqlens_q.shape[0] - 1, max_seqlen_q,
            max_seqlen_k, False, causal, window_left, window_right, softmax_scale, softcap)  # fmt: skip
    return out, lse


def varlen_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, window_left, window_right,
                softmax_scale, softcap, alibi_slopes, return_lse):  # fmt: skip
    _validate_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, window_left, window_right,
                     softcap, alibi_slopes)  # fmt: skip
    total_q, hq, d = q.shape
    return q.new_empty((total_q, hq, d)), q.new_empty((hq, total_q) if return_lse else (0,), dtype=torch.float32)
