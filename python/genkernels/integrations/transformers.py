"""genkernels attention for Hugging Face ``transformers`` models.

::

    import genkernels.integrations.transformers as gkt
    gkt.register()                       # once: adds attn_implementation="genkernels"
    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="genkernels")
    model.generate(**inputs, max_new_tokens=64)                            # DynamicCache
    model.generate(**inputs, max_new_tokens=64, cache_implementation="static")  # no copies per step

Every model whose attention goes through ``transformers``' ``AttentionInterface`` (tested: Llama,
Mistral, Qwen2, Gemma 2) then runs

- prefill (and any call with more than ``DECODE_MAX_QUERIES`` new tokens) through
  :func:`genkernels.flash_attention`, or :func:`genkernels.flash_attention_varlen` when the batch
  is padded;
- decoding steps through :func:`genkernels.decode_attention`, which reads the model's own cache
  tensors in place (no copy, no ``repeat_kv``): in the ``(batch, heads_kv, length, head_dim)``
  layer tensors of a ``DynamicCache`` or ``StaticCache`` each (sequence, kv head) pair is one
  contiguous run, passed to the kernel as a sequence with one kv head and its group of query
  heads; in a left-padded batch each pair's valid keys are addressed through a page table of
  one-token pages over the same memory.

Semantics follow ``transformers``' FlashAttention-2 path: causal attention aligned to the
bottom-right corner, ``sliding_window`` as ``window=(sliding_window - 1, ...)``, logit
``softcap``, GQA/MQA, non-causal modules (``module.is_causal = False``). The padding mask is the
2-D ``attention_mask`` (this module registers the same mask builder as FlashAttention-2: no mask
when nothing is padded). Each sequence's valid tokens must be one run: left padding (the usual
for generation) at any step, right padding as well when there is no cache or the attention is not
causal (encoders, cross-attention to padded encoder states). Other masks, dropout in
training, attention sinks (``s_aux``), position biases and ``output_attentions`` raise
``ValueError`` naming what is unsupported, rather than computing something else; use
``attn_implementation="sdpa"`` for those models.
"""
from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from ..decode import decode_attention
from ..flash import flash_attention, flash_attention_varlen

__all__ = ["NAME", "DECODE_MAX_QUERIES", "register", "attention_forward", "padding_mask"]

NAME = "genkernels"
# Calls with at most this many new tokens per sequence use the decode kernel (speculative and
# chunked decoding included); longer ones the flash (prefill) kernel.
DECODE_MAX_QUERIES = 16


def register(name: str = NAME) -> str:
    """Registers the attention function and its mask builder under ``name`` (idempotent) and
    returns the name, for ``attn_implementation=`` or ``model.set_attn_implementation``."""
    AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, padding_mask)
    return name


def padding_mask(batch_size, q_length=None, kv_length=None, q_offset=0, kv_offset=0, mask_function=None,
                 attention_mask=None, use_vmap=False, device=None, cache_position=None, **kwargs):  # fmt: skip
    """Mask builder registered with the attention function: ``None`` when every key the
    attention receives is valid (the causal and sliding-window structure is the kernels' job),
    otherwise a 2-D boolean mask ``(batch, span)`` over the first ``span`` keys: the 2-D padding
    mask's last ``kv_length`` columns (FlashAttention-2's convention), or, with no padding, all
    ones over the keys a ``StaticCache`` has filled (``q_offset + q_length - kv_offset``; its
    later slots are empty)."""
    if q_length is None:  # transformers 4.x passes the queries' cache positions instead
        q_length, q_offset = cache_position.shape[0], cache_position[0]
    if use_vmap:  # the model added an or/and mask function (e.g. bidirectional image tokens)
        _unsupported("a model-specific mask pattern (or_mask_function / and_mask_function)")
    if attention_mask is None:
        span = int(q_offset) + q_length - int(kv_offset)
        return None if span >= kv_length else torch.ones((batch_size, span), dtype=torch.bool, device=device)
    attention_mask = attention_mask[:, -kv_length:]
    if attention_mask.shape[1] == kv_length and bool(attention_mask.all()):
        return None
    return attention_mask


def _unsupported(what: str):
    raise ValueError(f"genkernels attention: {what} is not supported; use attn_implementation='sdpa' or 'eager'")


def attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """``transformers`` attention function: ``query (batch, heads_q, q_len, head_dim)``,
    ``key``/``value (batch, heads_kv, kv_len, head_dim)`` (the cache's tensors after its update),
    ``attention_mask`` from :func:`padding_mask`. Returns ``(output (batch, q_len, heads_q,
    head_dim), None)``."""
    if dropout and module.training:
        _unsupported(f"attention dropout ({dropout}) in training")
    if kwargs.get("output_attentions"):
        _unsupported("output_attentions=True")
    for name in ("s_aux", "position_bias", "cache"):
        if kwargs.get(name) is not None:
            _unsupported(f"`{name}`")
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        raise ValueError(
            f"genkernels attention expects 4-D query/key/value (batch, heads, seq, head_dim), got "
            f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}"
        )
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    causal = bool(is_causal)
    window = (-1, -1)
    if sliding_window is not None and sliding_window > 0:
        window = (sliding_window - 1, sliding_window - 1 if not causal else -1)
    opts = dict(causal=causal, window=window, softmax_scale=scaling, softcap=float(softcap or 0.0))

    batch, heads_q, q_len, _ = query.shape
    heads_kv, kv_len = key.shape[1], key.shape[2]
    if key.shape != value.shape or key.shape[0] != batch or heads_kv == 0 or heads_q % heads_kv:
        raise ValueError(
            f"genkernels attention: key and value must be (batch={batch}, heads_kv, kv_len, head_dim) with heads_q "
            f"({heads_q}) a multiple of heads_kv, got {tuple(key.shape)} and {tuple(value.shape)}"
        )
    first = end = None
    span = kv_len
    if attention_mask is not None:
        first, end, unpadded = _runs(attention_mask, batch, q_len, kv_len, causal)
        span = attention_mask.shape[-1]  # keys [0, span); a StaticCache's later slots are empty
        if unpadded:
            first = end = None
    if q_len <= DECODE_MAX_QUERIES and causal and (q_len < span or q_len == 1):
        return _decode_by_kv_head(query, key, value, span, first, end, opts), None

    # (batch, seq, heads, head_dim) views of the model's tensors: nothing is copied
    q, k, v = query.transpose(1, 2), key[:, :, :span].transpose(1, 2), value[:, :, :span].transpose(1, 2)
    if first is not None:
        return _padded(q, k, v, first, end, span, opts), None
    packed = _packed_segments(kwargs, batch, q_len, span) if attention_mask is None else None
    if packed is not None:
        out = flash_attention_varlen(q[0], k[0], v[0], *packed, **opts)
        return out.unsqueeze(0), None
    return flash_attention(q, k, v, **opts), None


def _packed_segments(kwargs, batch: int, q_len: int, kv_len: int):
    """``(cu_seqlens_q, cu_seqlens_k, max_q, max_k)`` when one row holds several packed sequences
    (``transformers``' flattening collator): given as ``cu_seq_lens_q``/``cu_seq_lens_k`` (with
    ``max_length_q``/``max_length_k``), or read from ``position_ids`` restarting at their minimum,
    as the FlashAttention-2 integration does; ``None`` for an ordinary batch."""
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is not None and cu_k is not None:
        if batch != 1:
            raise ValueError(f"genkernels attention: cu_seq_lens_q/k need a batch of 1 (packed rows), got {batch}")
        max_q, max_k = kwargs.get("max_length_q"), kwargs.get("max_length_k")
        max_q = int(max_q) if max_q is not None else int((cu_q[1:] - cu_q[:-1]).max())
        max_k = int(max_k) if max_k is not None else int((cu_k[1:] - cu_k[:-1]).max())
        return cu_q.to(torch.int32), cu_k.to(torch.int32), max_q, max_k
    pos = kwargs.get("position_ids")
    if pos is None or batch != 1 or q_len != kv_len or q_len == 1 or pos.numel() != q_len:
        return None
    pos = pos.reshape(-1)
    starts = (pos == pos.min()).nonzero().view(-1)
    if starts.numel() <= 1:
        return None
    cu = torch.cat((starts, starts.new_tensor([q_len]))).to(torch.int32)
    if starts[0] != 0:
        raise ValueError("genkernels attention: packed position_ids must start a sequence at the first token")
    longest = int((cu[1:] - cu[:-1]).max())
    return cu, cu, longest, longest


# The model passes one mask object to every layer of a kind (full or sliding) in a forward: the
# analyses of the last two are kept for the next layers (keyed by the object, its version counter,
# so that an in-place edit is seen, and the sizes).
_last_runs: list = [None, None]  # (mask, version, (batch, q_len, kv_len), result) each, replaced whole


def _runs(mask: torch.Tensor, batch: int, q_len: int, kv_len: int, causal: bool = True):
    """``(first, end, unpadded)``: first and one-past-last valid index of each row of a 2-D
    padding mask, and whether no row is padded; raises unless each row's valid entries form one
    run, which for causal attention the queries (the last ``q_len`` of the mask's span) end."""
    # (inference tensors have no version counter: they are analysed every time)
    version = -1 if mask.is_inference() else mask._version
    for memo in tuple(_last_runs):
        if memo is not None and memo[0] is mask and memo[1] == version >= 0 and memo[2] == (batch, q_len, kv_len,
                                                                                          causal):  # fmt: skip
            return memo[3]
    if mask.dim() != 2 or mask.shape[0] != batch or not (q_len if causal else 1) <= mask.shape[1] <= kv_len:
        raise ValueError(
            f"genkernels attention: attention_mask must be a 2-D padding mask (batch={batch}, n) with "
            f"{q_len if causal else 1} <= n <= {kv_len} (the keys), got shape {tuple(mask.shape)}"
        )
    m = mask.to(torch.bool)
    n = m.shape[1]
    idx = torch.arange(n, device=m.device)
    count = m.sum(1)
    first = torch.where(count > 0, torch.where(m, idx, n).amin(1), 0)
    end = torch.where(m, idx + 1, 0).amax(1)
    if bool((count != end - first).any()):
        _unsupported("an attention_mask whose valid tokens are not one run per sequence (left or right padding)")
    if causal and q_len < n and bool((end != n).any()):
        _unsupported("right padding with a cache (the new tokens must be the last of each sequence)")
    result = first, end, bool(((first == 0) & (end == n)).all())
    _last_runs[:] = [(mask, version, (batch, q_len, kv_len, causal), result), _last_runs[0]]
    return result


def _padded(q, k, v, first, end, span, opts):
    """Prefill of a padded batch: sequence b's valid keys are ``[first[b], end[b])`` of the first
    ``span``; its queries the valid ones among the last ``q_len`` tokens of the span, except in
    non-causal attention to other tokens (cross-attention: ``q_len != span``), where every query
    is valid."""
    _, q_len, heads_q, head_dim = q.shape
    kv_len = k.shape[1]
    if not opts["causal"] and q_len != span:
        q_first, q_lens = torch.zeros_like(first), torch.full_like(first, q_len)
    else:
        q_first = (first - (span - q_len)).clamp(min=0)
        q_lens = (end - (span - q_len)).clamp(min=0) - q_first
    k_lens = end - first
    qi = _token_index(q_first, q_lens, q_len)
    ki = _token_index(first, k_lens, kv_len)
    out = torch.zeros_like(q, memory_format=torch.contiguous_format)
    if qi.numel() == 0:
        return out
    cu_q = torch.nn.functional.pad(q_lens.cumsum(0), (1, 0)).to(torch.int32)
    cu_k = torch.nn.functional.pad(k_lens.cumsum(0), (1, 0)).to(torch.int32)
    flat = lambda t: t.reshape(-1, *t.shape[2:])  # noqa: E731  (copies only for strided inputs)
    packed = flash_attention_varlen(
        flat(q).index_select(0, qi), flat(k).index_select(0, ki), flat(v).index_select(0, ki), cu_q, cu_k,
        int(q_lens.max()), int(k_lens.max()), **opts,
    )  # fmt: skip
    out.view(-1, heads_q, head_dim).index_copy_(0, qi, packed)
    return out


def _token_index(first: torch.Tensor, lens: torch.Tensor, row: int) -> torch.Tensor:
    """Flat indices ``b * row + first[b] + i`` for ``i < lens[b]``, sequence after sequence."""
    total = int(lens.sum())
    starts = torch.arange(first.shape[0], device=first.device) * row + first
    seq = torch.repeat_interleave(torch.arange(first.shape[0], device=first.device), lens, output_size=total)
    seq_start = torch.repeat_interleave(lens.cumsum(0) - lens, lens, output_size=total)
    offset = torch.arange(total, device=first.device) - seq_start
    return starts[seq] + offset


def _decode_by_kv_head(query, key, value, span, first, end, opts):
    """The decode kernel over the model's ``(batch, heads_kv, length, head_dim)`` cache tensors,
    read in place, each (sequence, kv head) pair taken as a sequence of its own with one kv head
    and its group of query heads: every pair's keys are then one contiguous run of memory, which
    the kernel streams faster than eight runs a head apart (the view of the same tensors as one
    ``(batch, length, heads_kv, head_dim)`` cache: fp32 +7-14 points of the read rate here).
    Left padding (``first``/``end`` given): one-token pages over the same memory, pair p's token
    t being page ``p * length + t``."""
    batch, heads_q, q_len, head_dim = query.shape
    heads_kv, length = key.shape[1], key.shape[2]
    group, pairs = heads_q // heads_kv, batch * heads_kv
    # (pairs, q_len, group, head_dim); a view for one query token, a small copy for more
    q = query.reshape(pairs, group, q_len, head_dim).transpose(1, 2)
    try:
        if first is None:
            k, v = (t[:, :, :span].view(pairs, span, 1, head_dim) for t in (key, value))
        else:
            k, v = (t.view(pairs * length, 1, 1, head_dim) for t in (key, value))
    except RuntimeError:  # strides that do not merge (not a cache's tensors): copy into that layout
        key, value = key.contiguous(), value.contiguous()
        return _decode_by_kv_head(query, key, value, span, first, end, opts)
    if first is None:
        seqlens = torch.full((pairs,), span, dtype=torch.int32, device=query.device)
        out = decode_attention(q, k, v, seqlens, **opts)
    else:
        lens, table = _token_pages(first, end, heads_kv, length)
        out = decode_attention(q, k, v, lens, block_table=table, **opts)
    # (pairs, q_len, group, d) -> (batch, q_len, heads_q, d): a view for one query token
    return out.view(batch, heads_kv, q_len, group, head_dim).transpose(1, 2).reshape(batch, q_len, heads_q, head_dim)


# The page table of the last padded batch, for the next layers (their _runs gave the same first
# and end tensors): (first, end, (heads_kv, length), (lens, table)), replaced whole.
_last_pages: list = [None]


def _token_pages(first: torch.Tensor, end: torch.Tensor, heads_kv: int, length: int):
    """int32 ``(lens, table)`` of one-token pages for the (sequence, kv head) pairs: pair p's
    token t is page ``p * length + first[b] + t`` of the cache memory viewed as rows."""
    memo = _last_pages[0]
    if memo is not None and memo[0] is first and memo[1] is end and memo[2] == (heads_kv, length):
        return memo[3]
    pairs = first.shape[0] * heads_kv
    lens = (end - first).repeat_interleave(heads_kv)
    cols = torch.arange(max(int(lens.max()), 1), device=first.device)
    starts = torch.arange(pairs, device=first.device) * length + first.repeat_interleave(heads_kv)
    table = torch.where(cols < lens[:, None], starts[:, None] + cols, 0).to(torch.int32)
    result = lens.to(torch.int32), table
    _last_pages[0] = (first, end, (heads_kv, length), result)
    return result
