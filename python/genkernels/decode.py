"""KV-cache decode attention: a few new query tokens per sequence against a long cache, contiguous
or paged, with GQA packing and split-KV.

Semantics follow FlashAttention's ``flash_attn_with_kvcache``: sequence ``b`` holds
``cache_seqlens[b]`` keys, and query ``i`` of ``seqlen_q`` sits at position
``i + cache_seqlens[b] - seqlen_q`` (bottom-right aligned causal mask and windows). A row that sees
no key (e.g. an empty cache) gives output 0 and LSE ``-inf``.
"""
from __future__ import annotations

import math
import numbers

import torch

from . import _native
from ._checks import (FLOAT_DTYPES, check_flag, check_number, check_same_device, check_same_dtype, check_shape,
                      check_softcap, check_softmax_scale, check_tensor)
from .tools.instantiations import DECODE_HEAD_DIMS


_Tensor = torch.Tensor
_NO_WINDOW = (-1, -1)  # decode_attention's default window, recognised by identity on the fast path
_is_compiling = torch.compiler.is_compiling
_dispatch_stack_len = torch._C._len_torch_dispatch_stack
_function_mode_enabled = torch._C._is_torch_function_mode_enabled


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    *,
    block_table: torch.Tensor | None = None,
    causal: bool = True,
    window: tuple[int, int] = _NO_WINDOW,
    softmax_scale: float | None = None,
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    num_splits: int = 0,
    return_lse: bool = False,
):
    """Attention of ``q`` over the first ``cache_seqlens[b]`` keys of each sequence's cache.

    Args:
        q: ``(batch, seqlen_q, heads_q, head_dim)``, float32/float16/bfloat16, last dim contiguous.
        k_cache, v_cache: contiguous cache ``(batch, capacity, heads_kv, head_dim)`` or, with
            ``block_table``, paged cache ``(num_pages, page_size, heads_kv, head_dim)`` (page_size a
            power of two); q's dtype; ``heads_q % heads_kv == 0`` (GQA/MQA).
        cache_seqlens: int32 ``(batch,)``, each in ``[0, capacity]``.
        block_table: int32 ``(batch, max_pages)``: page ``i`` of sequence ``b`` is
            ``block_table[b, i]``; only the pages holding its ``cache_seqlens[b]`` tokens are read.
        causal: bottom-right aligned causal mask (for ``seqlen_q > 1``).
        window: ``(left, right)`` inclusive sliding window, -1 for unbounded.
        softmax_scale: default ``head_dim ** -0.5``.
        softcap: if > 0, scores become ``softcap * tanh(scores / softcap)``.
        alibi_slopes: float32 ``(heads_q,)`` or ``(batch, heads_q)``: adds
            ``-slope * |query position - key position|``.
        num_splits: split-KV count; 0 picks one that fills the machine.
        return_lse: also return the fp32 log-sum-exp ``(batch, heads_q, seqlen_q)``.

    Returns:
        ``out`` ``(batch, seqlen_q, heads_q, head_dim)`` in q's dtype, or ``(out, lse)``.

    Values of ``cache_seqlens`` and of the used ``block_table`` entries are checked on the CPU
    (ValueError naming the entry). On CUDA the host does not read them (that would synchronise
    every call); the kernel guards instead: a sequence whose length is outside
    ``[0, capacity]`` or whose pages read include an index outside ``[0, num_pages)`` never
    reads outside the cache, and its output rows and LSE are NaN (an error state, distinct from
    the 0 / ``-inf`` of an empty sequence). Other sequences are unaffected.
    CUDA kernels exist for head dims in ``tools.instantiations.DECODE_HEAD_DIMS``.
    """
    # Decode runs once per layer per token. Plain eager CPU calls with plain tensors and default
    # window/ALiBi take _decode_cpu_fast directly: no dispatcher (~3 us), no helper-based checks
    # (~3 us), no log-sum-exp buffer unless asked for. It returns None when any check fails, and
    # the general path below then raises the named error. Anything that must see the op
    # (torch.compile, fake tensors, dispatch modes, tensor subclasses) goes through
    # torch.ops.genkernels.decode_attention as registered.
    if (type(q) is _Tensor and type(k_cache) is _Tensor and type(v_cache) is _Tensor and type(cache_seqlens) is _Tensor
            and (block_table is None or type(block_table) is _Tensor) and alibi_slopes is None and window is _NO_WINDOW
            and not _native._emulating_threads and not _is_compiling() and not _dispatch_stack_len()
            and not _function_mode_enabled() and type(return_lse) is bool):  # fmt: skip
        res = _decode_cpu_fast(q, k_cache, v_cache, cache_seqlens, block_table, causal, softmax_scale, softcap,
                               num_splits, return_lse)  # fmt: skip
        if res is not None:
            return res if return_lse else res[0]
    window_left, window_right = _check_window(window)
    scale = _resolve_scale(softmax_scale, q)
    causal, return_lse = check_flag("causal", causal), check_flag("return_lse", return_lse)
    if isinstance(num_splits, bool) or not isinstance(num_splits, numbers.Integral):
        raise TypeError(f"num_splits must be an int in [0, 1024] (0: automatic), got {num_splits!r}")
    num_splits = int(num_splits)  # a NumPy integer too
    args = (q, k_cache, v_cache, cache_seqlens, block_table, causal, window_left, window_right, scale,
            check_number("softcap", softcap), alibi_slopes, num_splits)  # fmt: skip
    if _plain_eager(q, k_cache, v_cache, cache_seqlens, block_table, alibi_slopes):
        out, lse = decode_impl(*args, want_lse=return_lse)
    else:
        out, lse = torch.ops.genkernels.decode_attention(*args)
    return (out, lse) if return_lse else out


def _plain_eager(*tensors) -> bool:
    """Whether the op implementation may run directly: eager mode (not tracing for
    torch.compile), no torch dispatch or function mode active (FakeTensorMode, make_fx,
    FlopCounterMode, ...), and every tensor argument a plain ``torch.Tensor`` (None allowed).
    decode_attention's fast-path condition is this test written out inline (a call costs more
    than the test there)."""
    if _is_compiling() or _dispatch_stack_len() or _function_mode_enabled():
        return False
    return all(t is None or type(t) is _Tensor for t in tensors)


# ------------------------------------------------------------------ validation
def _check_window(window) -> tuple[int, int]:
    if type(window) is tuple and window == (-1, -1) and type(window[0]) is int and type(window[1]) is int:
        return -1, -1  # the default, without the checks below
    if not (isinstance(window, (tuple, list)) and len(window) == 2 and all(isinstance(w, int) for w in window)):
        raise TypeError(f"window must be a pair of ints (left, right), got {window!r}")
    if window[0] < -1 or window[1] < -1:
        raise ValueError(f"window entries must be >= -1 (-1: unbounded), got {tuple(window)}")
    return int(window[0]), int(window[1])


def _resolve_scale(softmax_scale, q) -> float:
    if softmax_scale is None:
        if not isinstance(q, torch.Tensor) or q.dim() < 1:
            raise TypeError("q must be a torch.Tensor with a head_dim axis")
        if q.shape[-1] == 0:
            raise ValueError("q has head_dim 0; it must be at least 1")
        return q.shape[-1] ** -0.5
    return check_softmax_scale(softmax_scale)


def check_cache(
    k_cache, v_cache, cache_seqlens, block_table, batch: int, name_k: str = "k_cache", name_v: str = "v_cache"
) -> tuple[int, int, int]:
    """Checks a contiguous or paged cache pair; returns ``(capacity, page_size, num_pages)``
    (page_size 0 and num_pages 0 for a contiguous cache)."""
    check_tensor(name_k, k_cache, ndim=4, dtypes=FLOAT_DTYPES, last_dim_contiguous=True)
    check_tensor(name_v, v_cache, ndim=4, dtypes=FLOAT_DTYPES, last_dim_contiguous=True)
    if v_cache.shape != k_cache.shape:
        check_shape(name_v, v_cache, k_cache.shape, f"the shape of {name_k}")
    if v_cache.dtype != k_cache.dtype:
        check_same_dtype(**{name_k: k_cache, name_v: v_cache})
    check_tensor("cache_seqlens", cache_seqlens, ndim=1, dtypes=(torch.int32,), contiguous=True)
    if cache_seqlens.shape[0] != batch:
        check_shape("cache_seqlens", cache_seqlens, (batch,), "(batch,)")
    if block_table is None:
        if k_cache.shape[0] != batch:
            raise ValueError(
                f"{name_k} has {k_cache.shape[0]} sequences but the batch is {batch} "
                "(contiguous cache: (batch, capacity, heads_kv, head_dim); pass block_table for a paged cache)"
            )
        return k_cache.shape[1], 0, 0
    check_tensor("block_table", block_table, ndim=2, dtypes=(torch.int32,), last_dim_contiguous=True)
    if block_table.shape[0] != batch:
        raise ValueError(f"block_table must have shape (batch={batch}, max_pages), got {tuple(block_table.shape)}")
    page_size = k_cache.shape[1]
    if page_size < 1 or page_size & (page_size - 1):
        raise ValueError(f"page_size ({name_k}.shape[1]) must be a power of two, got {page_size}")
    return block_table.shape[1] * page_size, page_size, k_cache.shape[0]


def _max_rows_per_block(head_dim: int) -> int:
    # DecodeTraits::kMaxRows in csrc/cuda/decode_attention.cuh
    return 4 if head_dim >= 256 else 8


def _cuda_num_splits(q, batch, heads_kv, rows, capacity, head_dim) -> int:
    """Split count for the CUDA kernel: about two blocks per SM, at least 256 keys per split."""
    if q.device.type == "cuda":
        sms = torch.cuda.get_device_properties(q.device).multi_processor_count
    else:  # emulation: a small notional GPU keeps the emulated grid small
        sms = 2
    blocks = batch * heads_kv * -(-rows // _max_rows_per_block(head_dim))
    return max(1, min(-(-2 * sms // max(blocks, 1)), -(-capacity // 256), 64))


def _validate(q, k_cache, v_cache, cache_seqlens, block_table, window_left, window_right, softcap, alibi_slopes, num_splits):
    check_tensor("q", q, ndim=4, dtypes=FLOAT_DTYPES, last_dim_contiguous=True)
    batch, seqlen_q, heads_q, head_dim = q.shape
    capacity, page_size, num_pages = check_cache(k_cache, v_cache, cache_seqlens, block_table, batch)
    if k_cache.dtype != q.dtype:
        raise TypeError(f"k_cache has dtype {k_cache.dtype} but q has {q.dtype}; they must match")
    heads_kv = k_cache.shape[2]
    if k_cache.shape[3] != head_dim:
        raise ValueError(f"k_cache head_dim {k_cache.shape[3]} differs from q's {head_dim}")
    if heads_kv == 0 or heads_q % heads_kv:
        raise ValueError(f"heads_q ({heads_q}) must be a multiple of the cache's heads_kv ({heads_kv})")
    if window_left < -1 or window_right < -1:
        raise ValueError(f"window entries must be >= -1, got ({window_left}, {window_right})")
    check_softcap(softcap)
    if alibi_slopes is not None:
        check_tensor("alibi_slopes", alibi_slopes, dtypes=(torch.float32,), contiguous=True)
        if tuple(alibi_slopes.shape) not in ((heads_q,), (batch, heads_q)):
            raise ValueError(f"alibi_slopes must have shape ({heads_q},) or ({batch}, {heads_q}), got {tuple(alibi_slopes.shape)}")
    if not isinstance(num_splits, int) or not 0 <= num_splits <= 1024:
        raise ValueError(f"num_splits must be an int in [0, 1024] (0: automatic), got {num_splits!r}")
    dev, on_cuda = q.get_device(), q.is_cuda  # ints and bools: cheaper than torch.device objects
    if any(t is not None and (t.get_device() != dev or t.is_cuda != on_cuda)
           for t in (k_cache, v_cache, cache_seqlens, block_table, alibi_slopes)):  # fmt: skip
        check_same_device(q=q, k_cache=k_cache, v_cache=v_cache, cache_seqlens=cache_seqlens, block_table=block_table,
                          alibi_slopes=alibi_slopes)  # fmt: skip  (raises, naming the tensor)
    return batch, seqlen_q, heads_q, heads_kv, head_dim, capacity, page_size, num_pages


def _check_cuda_layout(q, k_cache, v_cache, head_dim):
    if head_dim not in DECODE_HEAD_DIMS:
        raise ValueError(f"head_dim {head_dim} has no CUDA decode kernel; supported: {DECODE_HEAD_DIMS}")
    chunk = 16 // k_cache.element_size()
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.data_ptr() % 16 or any(s % chunk for s in t.stride()[:3]):
            raise ValueError(f"{name} must be 16-byte aligned with strides that are multiples of {chunk} elements")


# ------------------------------------------------------------------ op implementation
def decode_impl(q, k_cache, v_cache, cache_seqlens, block_table, causal, window_left, window_right, softmax_scale,
                softcap, alibi_slopes, num_splits, *, want_lse: bool = True):  # fmt: skip
    """The op's implementation; ``want_lse=False`` (eager callers only) returns ``(out, None)``
    without allocating or writing the log-sum-exp."""
    batch, seqlen_q, heads_q, heads_kv, head_dim, capacity, page_size, num_pages = _validate(
        q, k_cache, v_cache, cache_seqlens, block_table, window_left, window_right, softcap, alibi_slopes, num_splits
    )
    out = torch.empty_like(q, memory_format=torch.contiguous_format)  # q's shape and dtype; cheaper than torch.empty
    lse = torch.empty((batch, heads_q, seqlen_q), dtype=torch.float32, device=q.device) if want_lse else None
    dev = _native.device_code(q)
    partial_out = partial_lse = None
    if dev != _native.DEVICE_CPU:
        _check_cuda_layout(q, k_cache, v_cache, head_dim)
        if num_splits == 0:
            num_splits = _cuda_num_splits(q, batch, heads_kv, seqlen_q * (heads_q // heads_kv), capacity, head_dim)
        if num_splits > 1:
            partial_out = torch.empty((num_splits, batch, seqlen_q, heads_q, head_dim), dtype=torch.float32, device=q.device)
            partial_lse = torch.empty((num_splits, batch, heads_q, seqlen_q), dtype=torch.float32, device=q.device)
    qs, ks, vs = q.stride(), k_cache.stride(), v_cache.stride()
    # (optional pointers inlined rather than through _native.ptr: this runs once per layer per token)
    bt_ptr, bt_stride = (0, 0) if block_table is None else (block_table.data_ptr(), block_table.stride(0))
    alibi_ptr, alibi_bstride = (0, 0) if alibi_slopes is None else (
        alibi_slopes.data_ptr(), 0 if alibi_slopes.dim() == 1 else alibi_slopes.stride(0))  # fmt: skip
    po_ptr, pl_ptr = (0, 0) if partial_out is None else (partial_out.data_ptr(), partial_lse.data_ptr())
    _native._C.decode_attention(
        dev, _native.DTYPE_CODE[q.dtype], q.data_ptr(), qs[0], qs[1], qs[2],
        k_cache.data_ptr(), v_cache.data_ptr(), ks[0], ks[1], ks[2], vs[0], vs[1], vs[2],
        bt_ptr, bt_stride, page_size, capacity, num_pages, cache_seqlens.data_ptr(), alibi_ptr, alibi_bstride,
        out.data_ptr(), 0 if lse is None else lse.data_ptr(), po_ptr, pl_ptr, batch, seqlen_q, heads_q, heads_kv, head_dim, num_splits,
        softmax_scale, softcap, causal, window_left, window_right, _native.stream_of(q) if dev != _native.DEVICE_CPU else 0,
        _native.num_threads(),
    )  # fmt: skip
    return out, lse


_INT32 = torch.int32


def _plain_cache_geometry(ksh, cache_seqlens, block_table, batch: int):
    """The fast paths' (decode, append) check of cache_seqlens and block_table against a cache of
    shape ``ksh``, inline: ``(capacity, page_size, num_pages, block_table address, its row
    stride)``, or None when anything is off (the general path then names it)."""
    if cache_seqlens.dtype != _INT32 or cache_seqlens.shape != (batch,) or cache_seqlens.stride() != (1,):
        return None
    if block_table is None:
        return None if ksh[0] != batch else (ksh[1], 0, 0, 0, 0)
    bsh, bst = block_table.shape, block_table.stride()
    page_size = ksh[1]
    if (block_table.dtype != _INT32 or len(bsh) != 2 or bsh[0] != batch or (bst[1] != 1 and bsh[1] > 1)
            or not block_table.is_cpu or page_size < 1 or page_size & (page_size - 1)):  # fmt: skip
        return None
    return bsh[1] * page_size, page_size, ksh[0], block_table.data_ptr(), bst[0]


def _decode_cpu_fast(q, k_cache, v_cache, cache_seqlens, block_table, causal, softmax_scale, softcap, num_splits,
                     want_lse):  # fmt: skip
    """The CPU call of one decode step with every check of ``_validate`` done inline (one read of
    each tensor attribute, no helper calls): about half of the wrapper's cost. Returns None when
    any check fails or the call is not a plain CPU one; decode_attention then takes the general
    path, which names the bad argument. Callers guarantee plain tensors, no ALiBi, the default
    window and no emulation."""
    if not q.is_cpu or type(causal) is not bool or type(softcap) is not float or not 0.0 <= softcap < math.inf:
        return None
    if type(num_splits) is not int or not 0 <= num_splits <= 1024:
        return None
    qsh, ksh = q.shape, k_cache.shape
    if len(qsh) != 4 or len(ksh) != 4 or v_cache.shape != ksh:
        return None
    batch, seqlen_q, heads_q, head_dim = qsh
    dt = q.dtype
    if (dt not in FLOAT_DTYPES or k_cache.dtype != dt or v_cache.dtype != dt or ksh[3] != head_dim
            or not (k_cache.is_cpu and v_cache.is_cpu and cache_seqlens.is_cpu)):  # fmt: skip
        return None
    heads_kv = ksh[2]
    if heads_kv == 0 or heads_q % heads_kv or head_dim == 0:
        return None
    if softmax_scale is None:
        softmax_scale = head_dim**-0.5
    elif type(softmax_scale) is not float or not math.isfinite(softmax_scale):
        return None
    qs, ks, vs = q.stride(), k_cache.stride(), v_cache.stride()
    if (qs[3] != 1 and head_dim > 1) or (ks[3] != 1 and head_dim > 1) or (vs[3] != 1 and head_dim > 1):
        return None
    geometry = _plain_cache_geometry(ksh, cache_seqlens, block_table, batch)
    if geometry is None:
        return None
    capacity, page_size, num_pages, bt_ptr, bt_stride = geometry
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty((batch, heads_q, seqlen_q), dtype=torch.float32) if want_lse else None
    _native._C.decode_attention(
        _native.DEVICE_CPU, _native.DTYPE_CODE[dt], q.data_ptr(), qs[0], qs[1], qs[2],
        k_cache.data_ptr(), v_cache.data_ptr(), ks[0], ks[1], ks[2], vs[0], vs[1], vs[2],
        bt_ptr, bt_stride, page_size, capacity, num_pages, cache_seqlens.data_ptr(), 0, 0,
        out.data_ptr(), 0 if lse is None else lse.data_ptr(), 0, 0, batch, seqlen_q, heads_q, heads_kv, head_dim,
        num_splits, softmax_scale, softcap, causal, -1, -1, 0, _native.num_threads(),
    )  # fmt: skip
    return out, lse


def decode_fake(q, k_cache, v_cache, cache_seqlens, block_table, causal, window_left, window_right, softmax_scale,
                softcap, alibi_slopes, num_splits):  # fmt: skip
    batch, seqlen_q, heads_q, _, head_dim, *_ = _validate(
        q, k_cache, v_cache, cache_seqlens, block_table, window_left, window_right, softcap, alibi_slopes, num_splits
    )
    return (
        torch.empty((batch, seqlen_q, heads_q, head_dim), dtype=q.dtype, device=q.device),
        torch.empty((batch, heads_q, seqlen_q), dtype=torch.float32, device=q.device),
    )
