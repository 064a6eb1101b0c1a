"""Writing to KV caches: ``append_kv_cache`` (with fused rotary embedding of the keys),
``apply_rotary`` for the queries, and ``PagedKVCache``, a small page allocator over a
preallocated pool for pipelines and tests.

Rotary embedding follows FlashAttention's ``apply_rotary_emb``: ``cos``/``sin`` are
``(positions, rotary_dim / 2)`` tables; non-interleaved (GPT-NeoX) rotates the pairs
``(x[i], x[i + rotary_dim/2])``, interleaved (GPT-J) the pairs ``(x[2i], x[2i+1])``; dimensions
from ``rotary_dim`` on pass through. The math is fp32, rounded once to the tensor's dtype.
"""
from __future__ import annotations

import numbers

import torch

from . import _native
from ._checks import FLOAT_DTYPES, check_flag, check_int, check_same_device, check_shape, check_tensor
from .decode import (_INT32, _Tensor, _dispatch_stack_len, _function_mode_enabled, _is_compiling,
                     _plain_cache_geometry, check_cache)


def append_kv_cache(
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    *,
    block_table: torch.Tensor | None = None,
    rotary_cos: torch.Tensor | None = None,
    rotary_sin: torch.Tensor | None = None,
    rotary_interleaved: bool = False,
) -> None:
    """Writes ``k_new``/``v_new`` ``(batch, seqlen_new, heads_kv, head_dim)`` at tokens
    ``cache_seqlens[b] ... + seqlen_new - 1`` of each sequence, rotating the keys at those
    positions when ``rotary_cos``/``rotary_sin`` are given, and adds ``seqlen_new`` to
    ``cache_seqlens`` in place. Caches as in :func:`genkernels.decode_attention`.

    On the CPU, raises ``ValueError`` before writing anything if a sequence would exceed the
    cache capacity (or the rotary table), a page index it writes is outside the pool, or two new
    tokens would land in one cache slot (``block_table`` rows may share pages, e.g. a common
    prefix, but not where they append: copy a shared page first). On CUDA these values live on
    the device and are not read by the host (that would synchronise every call): the kernel
    checks each sequence's range instead, and a sequence out of range is skipped whole: nothing
    of it is written and its ``cache_seqlens`` entry is not advanced (compare ``cache_seqlens``
    with the expected lengths to detect it). Other sequences are appended. Writes that share a
    slot are not detected there; which one the slot keeps is unspecified. Caches whose own
    elements share memory (expanded views), or ``k_cache`` and ``v_cache`` at one address, raise
    ``ValueError`` on every device."""
    # Once per layer per generated token, as decode_attention: plain eager CPU calls take
    # _append_cpu_fast (no dispatcher, checks inline); it declines anything else, and the op
    # then runs as registered (torch.compile, fake tensors, modes, subclasses, CUDA) and names
    # the bad argument.
    if (type(k_new) is _Tensor and type(v_new) is _Tensor and type(k_cache) is _Tensor and type(v_cache) is _Tensor
            and type(cache_seqlens) is _Tensor and (block_table is None or type(block_table) is _Tensor)
            and (rotary_cos is None or type(rotary_cos) is _Tensor) and (rotary_sin is None or type(rotary_sin) is _Tensor)
            and type(rotary_interleaved) is bool
            and not _native._emulating_threads and not _is_compiling() and not _dispatch_stack_len()
            and not _function_mode_enabled()):  # fmt: skip
        if _append_cpu_fast(k_new, v_new, k_cache, v_cache, cache_seqlens, block_table, rotary_cos, rotary_sin,
                            rotary_interleaved):  # fmt: skip
            return
    torch.ops.genkernels.append_kv_cache(
        k_new, v_new, k_cache, v_cache, cache_seqlens, block_table, rotary_cos, rotary_sin,
        check_flag("rotary_interleaved", rotary_interleaved),
    )


def apply_rotary(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor, *, interleaved: bool = False
) -> torch.Tensor:
    """Rotary embedding of ``x`` ``(batch, seqlen, heads, head_dim)`` (e.g. the queries of a
    decode step) at ``positions``: int ``(batch, seqlen)``, or ``(batch,)`` start positions
    (token ``s`` at ``positions[b] + s``, e.g. ``cache_seqlens`` before the append). Returns a
    new contiguous tensor. Positions outside ``[0, cos.shape[0])`` raise ``ValueError`` on the
    CPU; on CUDA (not checked on the host, that would synchronise) their rows come out NaN."""
    if (type(x) is _Tensor and type(cos) is _Tensor and type(sin) is _Tensor and type(positions) is _Tensor
            and type(interleaved) is bool and not _native._emulating_threads and not _is_compiling()
            and not _dispatch_stack_len() and not _function_mode_enabled()):  # fmt: skip
        out = _rotary_cpu_fast(x, cos, sin, positions, interleaved)  # see append_kv_cache
        if out is not None:
            return out
    return torch.ops.genkernels.apply_rotary(x, cos, sin, positions, check_flag("interleaved", interleaved))


# ------------------------------------------------------------------ implementation
_FLOAT32 = torch.float32  # a fast-path alias like those imported from decode.py, which has no float32 one


def _fast_tables(cos, sin, head_dim: int):
    """(cos address, sin address, rotary_dim, positions) of float32 contiguous CPU tables of a
    valid shape, or None (the general path converts other tables and names bad ones)."""
    csh = cos.shape
    if (len(csh) != 2 or sin.shape != csh or cos.dtype != _FLOAT32 or sin.dtype != _FLOAT32
            or not (cos.is_cpu and sin.is_cpu and cos.is_contiguous() and sin.is_contiguous())
            or not 2 <= 2 * csh[1] <= head_dim):  # fmt: skip
        return None
    return cos.data_ptr(), sin.data_ptr(), 2 * csh[1], csh[0]


def _rotary_cpu_fast(x, cos, sin, positions, interleaved):
    """apply_rotary for plain CPU tensors with the checks inline, as _append_cpu_fast: float32
    tables, int32 positions ((batch, seqlen), or (batch,) for one token). None: not taken."""
    xsh = x.shape
    if len(xsh) != 4 or x.dtype not in FLOAT_DTYPES or not (x.is_cpu and positions.is_cpu):
        return None
    batch, seqlen, heads, head_dim = xsh
    xs = x.stride()
    if (xs[3] != 1 and head_dim > 1) or head_dim == 0 or positions.dtype != _INT32:
        return None
    psh, pst = positions.shape, positions.stride()
    if psh == (batch, seqlen):
        pos_sb, pos_ss = pst
    elif psh == (batch,) and seqlen == 1:
        pos_sb, pos_ss = pst[0], 0
    else:
        return None
    tables = _fast_tables(cos, sin, head_dim)
    if tables is None:
        return None
    out = torch.empty(xsh, dtype=x.dtype)
    _native._C.apply_rotary(
        _native.DEVICE_CPU, _native.DTYPE_CODE[x.dtype], x.data_ptr(), xs[0], xs[1], xs[2], out.data_ptr(),
        positions.data_ptr(), pos_sb, pos_ss, *tables, interleaved, batch, seqlen, heads, head_dim, 0,
        _native.num_threads(),
    )  # fmt: skip
    return out


def _append_cpu_fast(k_new, v_new, k_cache, v_cache, cache_seqlens, block_table, cos, sin, interleaved) -> bool:
    """append_kv_cache for plain CPU tensors, with _validate_append's checks inline (one read of
    each attribute, no helpers): 12.6 -> ~5 us a call. Returns False, having done nothing, when a
    check fails or the call is not of that kind (append_kv_cache then takes the general path,
    which names the bad argument). Contiguous caches only (they cannot overlap themselves);
    rotary tables only as float32 contiguous ones (the general path converts others). The index
    values are checked by the native code, as on the general path."""
    nsh, ksh = k_new.shape, k_cache.shape
    if len(nsh) != 4 or len(ksh) != 4 or v_new.shape != nsh or v_cache.shape != ksh:
        return False
    batch, seqlen_new, heads_kv, head_dim = nsh
    dt = k_new.dtype
    if (dt not in FLOAT_DTYPES or v_new.dtype != dt or k_cache.dtype != dt or v_cache.dtype != dt
            or ksh[2] != heads_kv or ksh[3] != head_dim or heads_kv == 0 or head_dim == 0):  # fmt: skip
        return False
    if not (k_new.is_cpu and v_new.is_cpu and k_cache.is_cpu and v_cache.is_cpu and cache_seqlens.is_cpu):
        return False
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()) or k_cache.data_ptr() == v_cache.data_ptr():
        return False
    kns, vns = k_new.stride(), v_new.stride()
    if (kns[3] != 1 or vns[3] != 1) and head_dim > 1:
        return False
    geometry = _plain_cache_geometry(ksh, cache_seqlens, block_table, batch)
    if geometry is None:
        return False
    capacity, page_size, num_pages, bt_ptr, bt_stride = geometry
    cos_ptr = sin_ptr = rotary_dim = positions = 0
    if cos is not None or sin is not None:
        tables = None if cos is None or sin is None else _fast_tables(cos, sin, head_dim)
        if tables is None:
            return False
        cos_ptr, sin_ptr, rotary_dim, positions = tables
    ks, vs = k_cache.stride(), v_cache.stride()
    _native._C.append_kv_cache(
        _native.DEVICE_CPU, _native.DTYPE_CODE[dt], k_new.data_ptr(), v_new.data_ptr(),
        kns[0], kns[1], kns[2], vns[0], vns[1], vns[2], k_cache.data_ptr(), v_cache.data_ptr(),
        ks[0], ks[1], ks[2], vs[0], vs[1], vs[2], bt_ptr, bt_stride, page_size, capacity, num_pages,
        cache_seqlens.data_ptr(), batch, seqlen_new, heads_kv, head_dim, cos_ptr, sin_ptr, rotary_dim, positions,
        interleaved, 0, _native.num_threads(),
    )  # fmt: skip
    return True


def _check_rotary_tables(cos, sin, head_dim: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    check_tensor("rotary_cos", cos, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor("rotary_sin", sin, ndim=2, dtypes=FLOAT_DTYPES)
    check_shape("rotary_sin", sin, cos.shape, "the shape of rotary_cos")
    if cos.device != device:
        raise ValueError(f"rotary_cos is on {cos.device} but the cache is on {device}")
    rotary_dim = 2 * cos.shape[1]
    if not 2 <= rotary_dim <= head_dim:
        raise ValueError(f"rotary_cos must have shape (positions, rotary_dim / 2) with 2 <= rotary_dim <= head_dim ({head_dim}), got {tuple(cos.shape)}")
    return cos.float().contiguous(), sin.float().contiguous()


def _validate_append(k_new, v_new, k_cache, v_cache, cache_seqlens, block_table, rotary_cos, rotary_sin):
    check_tensor("k_new", k_new, ndim=4, dtypes=FLOAT_DTYPES, last_dim_contiguous=True)
    check_tensor("v_new", v_new, ndim=4, dtypes=FLOAT_DTYPES, last_dim_contiguous=True)
    check_shape("v_new", v_new, k_new.shape, "the shape of k_new")
    batch, seqlen_new, heads_kv, head_dim = k_new.shape
    capacity, page_size, num_pages = check_cache(k_cache, v_cache, cache_seqlens, block_table, batch)
    if k_cache.shape[2:] != (heads_kv, head_dim):
        raise ValueError(f"k_new has (heads_kv, head_dim) = {(heads_kv, head_dim)} but k_cache has {tuple(k_cache.shape[2:])}")
    for name, t in (("k_new", k_new), ("v_new", v_new)):
        if t.dtype != k_cache.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but k_cache has {k_cache.dtype}; they must match")
    if (rotary_cos is None) != (rotary_sin is None):
        raise ValueError("rotary_cos and rotary_sin must be given together")
    # Writes through aliased memory would race (several tokens into one element). The
    # value-dependent case, block_table rows that share a page where they append, is checked with
    # the indices (CPU); k_cache and v_cache at one address, in append_impl.
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if torch._debug_has_internal_overlap(t) == 1:
            raise ValueError(f"{name} has elements that share memory (an expanded or stride-0 view?); append_kv_cache "
                             "writes into it, so it needs memory of its own")  # fmt: skip
    check_same_device(k_new=k_new, v_new=v_new, k_cache=k_cache, v_cache=v_cache, cache_seqlens=cache_seqlens,
                      block_table=block_table)  # fmt: skip
    return batch, seqlen_new, heads_kv, head_dim, capacity, page_size, num_pages


def append_impl(k_new, v_new, k_cache, v_cache, cache_seqlens, block_table, rotary_cos, rotary_sin, rotary_interleaved):
    batch, seqlen_new, heads_kv, head_dim, capacity, page_size, num_pages = _validate_append(
        k_new, v_new, k_cache, v_cache, cache_seqlens, block_table, rotary_cos, rotary_sin
    )
    if k_cache.numel() and k_cache.data_ptr() == v_cache.data_ptr():  # (fake tensors have no addresses)
        raise ValueError("k_cache and v_cache are the same memory; append_kv_cache writes keys and values to separate caches")
    cos = sin = None
    rotary_dim = rotary_positions = 0
    if rotary_cos is not None:
        cos, sin = _check_rotary_tables(rotary_cos, rotary_sin, head_dim, k_cache.device)
        rotary_dim, rotary_positions = 2 * cos.shape[1], cos.shape[0]
    # Index values (cache_seqlens, block_table) are checked by the native code on host memory;
    # on CUDA by the kernel, per sequence (see append_kv_cache): no synchronisation here.
    ks, vs, kns, vns = k_cache.stride(), v_cache.stride(), k_new.stride(), v_new.stride()
    _native._C.append_kv_cache(
        _native.device_code(k_cache), _native.DTYPE_CODE[k_cache.dtype], k_new.data_ptr(), v_new.data_ptr(),
        kns[0], kns[1], kns[2], vns[0], vns[1], vns[2], k_cache.data_ptr(), v_cache.data_ptr(),
        ks[0], ks[1], ks[2], vs[0], vs[1], vs[2], _native.ptr(block_table),
        0 if block_table is None else block_table.stride(0), page_size, capacity, num_pages, cache_seqlens.data_ptr(),
        batch, seqlen_new, heads_kv, head_dim, _native.ptr(cos), _native.ptr(sin), rotary_dim, rotary_positions,
        rotary_interleaved, _native.stream_of(k_cache), _native.num_threads(),
    )  # fmt: skip


def append_fake(k_new, v_new, k_cache, v_cache, cache_seqlens, block_table, rotary_cos, rotary_sin, rotary_interleaved):
    _validate_append(k_new, v_new, k_cache, v_cache, cache_seqlens, block_table, rotary_cos, rotary_sin)


def _positions_2d(positions, batch: int, seqlen: int) -> torch.Tensor:
    check_tensor("positions", positions, dtypes=(torch.int32, torch.int64))
    if positions.dim() == 1:
        check_shape("positions", positions, (batch,), "(batch,) start positions or (batch, seqlen)")
        positions = positions[:, None] + torch.arange(seqlen, device=positions.device, dtype=positions.dtype)
    else:
        check_shape("positions", positions, (batch, seqlen), "(batch,) start positions or (batch, seqlen)")
    return positions.to(torch.int32)


def rotary_impl(x, cos, sin, positions, interleaved):
    check_tensor("x", x, ndim=4, dtypes=FLOAT_DTYPES, last_dim_contiguous=True)
    batch, seqlen, heads, head_dim = x.shape
    cos, sin = _check_rotary_tables(cos, sin, head_dim, x.device)
    pos = _positions_2d(positions, batch, seqlen)
    check_same_device(x=x, positions=pos)
    out = torch.empty((batch, seqlen, heads, head_dim), dtype=x.dtype, device=x.device)
    xs = x.stride()
    _native._C.apply_rotary(
        _native.device_code(x), _native.DTYPE_CODE[x.dtype], x.data_ptr(), xs[0], xs[1], xs[2], out.data_ptr(),
        pos.data_ptr(), pos.stride(0), pos.stride(1), cos.data_ptr(), sin.data_ptr(), 2 * cos.shape[1], cos.shape[0],
        interleaved, batch, seqlen, heads, head_dim, _native.stream_of(x), _native.num_threads(),
    )  # fmt: skip
    return out


def rotary_fake(x, cos, sin, positions, interleaved):
    check_tensor("x", x, ndim=4, dtypes=FLOAT_DTYPES, last_dim_contiguous=True)
    _check_rotary_tables(cos, sin, x.shape[-1], x.device)
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


# ------------------------------------------------------------------ page allocator
class PagedKVCache:
    """A pool of ``num_pages`` pages of ``page_size`` tokens for K and V, shared by sequences.

    Sequences get pages on demand (``allocate``/``extend``) and return them with ``free``;
    ``block_table``/``seqlens`` build the int32 tensors the ops take for a batch of sequences.
    ``append`` and ``decode`` wrap :func:`append_kv_cache` and :func:`genkernels.decode_attention`.
    Page tables are padded with page 0, which the kernels never read past ``cache_seqlens``.
    """
    # Each sequence's pages also sit in a row of one int32 table (host memory), written as pages
    # are added, so that block_table() is one index_select rather than a tensor built from
    # Python lists every step (2 x 250 pages: 28 us that way).

    def __init__(self, num_pages: int, page_size: int, heads_kv: int, head_dim: int, *,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):  # fmt: skip
        num_pages, page_size = check_int("num_pages", num_pages), check_int("page_size", page_size)
        heads_kv, head_dim = check_int("heads_kv", heads_kv), check_int("head_dim", head_dim)
        if page_size < 1 or page_size & (page_size - 1):
            raise ValueError(f"page_size must be a power of two, got {page_size}")
        if num_pages < 1:
            raise ValueError(f"num_pages must be >= 1, got {num_pages}")
        if heads_kv < 1 or head_dim < 1:
            raise ValueError(f"heads_kv and head_dim must be >= 1, got {heads_kv} and {head_dim}")
        self.page_size = page_size
        self.k = torch.zeros((num_pages, page_size, heads_kv, head_dim), dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self._free: list[int] = list(range(num_pages - 1, -1, -1))  # pop() hands out low pages first
        self._pages: dict[int, list[int]] = {}
        self._lengths: dict[int, int] = {}
        self._next_id = 0
        self._table = torch.zeros((8, 16), dtype=torch.int32)  # row self._row[seq]: its pages, then 0s
        self._row: dict[int, int] = {}
        self._free_rows: list[int] = []

    def _write_row(self, seq: int, start: int) -> None:
        """Copies the sequence's pages from index `start` on into its table row (growing the table)."""
        pages, row = self._pages[seq], self._row[seq]
        rows, cols = self._table.shape
        if row >= rows or len(pages) > cols:
            grown = torch.zeros((max(rows, 2 * row + 1), max(cols, 2 * len(pages))), dtype=torch.int32)
            grown[:rows, :cols] = self._table
            self._table = grown
        if start < len(pages):
            self._table[row, start:len(pages)] = torch.tensor(pages[start:], dtype=torch.int32)

    @property
    def num_free_pages(self) -> int:
        return len(self._free)

    def _pages_for(self, num_tokens: int) -> int:
        """Pages that hold `num_tokens` tokens."""
        return -(-num_tokens // self.page_size)

    def _seq_pages(self, seq: int) -> list[int]:
        pages = self._pages.get(seq) if isinstance(seq, numbers.Integral) and not isinstance(seq, bool) else None
        if pages is None:
            raise KeyError(f"PagedKVCache: no sequence {seq!r} (ids come from allocate(); freed ones are gone)")
        return pages

    def allocate(self, num_tokens: int = 0) -> int:
        """Starts an empty sequence with room for `num_tokens`; returns its id. Raises
        MemoryError, allocating nothing, when the free pages do not suffice."""
        num_tokens = check_int("num_tokens", num_tokens)
        if num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
        need = self._pages_for(num_tokens)
        if need > len(self._free):
            raise MemoryError(f"PagedKVCache: a sequence of {num_tokens} tokens needs {need} pages, "
                              f"{len(self._free)} are free")  # fmt: skip
        seq = self._next_id
        self._next_id += 1
        self._pages[seq], self._lengths[seq] = [self._free.pop() for _ in range(need)], 0
        self._row[seq] = self._free_rows.pop() if self._free_rows else len(self._row)
        self._write_row(seq, 0)
        return seq

    def reserve(self, seq: int, num_tokens: int) -> None:
        """Makes room for `num_tokens` tokens in total (pages are added, never removed)."""
        pages = self._seq_pages(seq)
        num_tokens = check_int("num_tokens", num_tokens)
        need = self._pages_for(num_tokens) - len(pages)
        if need > len(self._free):
            raise MemoryError(f"PagedKVCache: sequence {seq} needs {need} more pages, {len(self._free)} are free")
        old = len(pages)
        pages.extend(self._free.pop() for _ in range(max(need, 0)))
        self._write_row(seq, old)

    def extend(self, seq: int, num_new_tokens: int) -> None:
        """Makes room for `num_new_tokens` more tokens after the sequence's current length."""
        length = self.length(seq)
        num_new_tokens = check_int("num_new_tokens", num_new_tokens)
        if num_new_tokens < 0:
            raise ValueError(f"num_new_tokens must be >= 0, got {num_new_tokens}")
        self.reserve(seq, length + num_new_tokens)

    def free(self, seq: int) -> None:
        pages = self._seq_pages(seq)
        self._free.extend(reversed(pages))
        row = self._row.pop(seq)
        self._table[row, : len(pages)] = 0  # a row is reused padded with page 0
        self._free_rows.append(row)
        del self._pages[seq], self._lengths[seq]

    def length(self, seq: int) -> int:
        self._seq_pages(seq)
        return self._lengths[seq]

    def block_table(self, seqs: list[int]) -> torch.Tensor:
        width = max([len(self._seq_pages(s)) for s in seqs] + [1])
        rows = torch.tensor([self._row[s] for s in seqs], dtype=torch.int64)
        return self._table[:, :width].index_select(0, rows).to(self.k.device)

    def seqlens(self, seqs: list[int]) -> torch.Tensor:
        return torch.tensor([self.length(s) for s in seqs], dtype=torch.int32, device=self.k.device)

    def append(self, seqs: list[int], k_new: torch.Tensor, v_new: torch.Tensor, **rotary) -> None:
        """Appends ``(len(seqs), seqlen_new, heads_kv, head_dim)`` keys/values (allocating pages).
        All or nothing: unknown or repeated ids, or too few free pages for the whole batch, raise
        before any page is taken."""
        if len(set(seqs)) != len(seqs):
            dup = sorted({s for s in seqs if seqs.count(s) > 1})
            raise ValueError(f"PagedKVCache.append: sequence ids must be distinct (row b writes sequence "
                             f"seqs[b]), got {dup} more than once")  # fmt: skip
        check_tensor("k_new", k_new, ndim=4, dtypes=FLOAT_DTYPES)
        if k_new.shape[0] != len(seqs):
            raise ValueError(f"PagedKVCache.append: k_new must be (len(seqs)={len(seqs)}, seqlen_new, heads_kv, "
                             f"head_dim), got {tuple(k_new.shape)}")  # fmt: skip
        new = k_new.shape[1]
        need = sum(max(self._pages_for(self.length(s) + new) - len(self._pages[s]), 0) for s in seqs)
        if need > len(self._free):
            raise MemoryError(f"PagedKVCache: appending {new} tokens to {len(seqs)} sequences needs {need} more "
                              f"pages, {len(self._free)} are free")  # fmt: skip
        for s in seqs:
            self.extend(s, new)
        seqlens = self.seqlens(seqs)
        append_kv_cache(k_new, v_new, self.k, self.v, seqlens, block_table=self.block_table(seqs), **rotary)
        for s in seqs:
            self._lengths[s] += new

    def decode(self, seqs: list[int], q: torch.Tensor, **kwargs):
        """decode_attention of ``q`` ``(len(seqs), seqlen_q, heads_q, head_dim)`` over these sequences."""
        from .decode import decode_attention

        return decode_attention(q, self.k, self.v, self.seqlens(seqs), block_table=self.block_table(seqs), **kwargs)
