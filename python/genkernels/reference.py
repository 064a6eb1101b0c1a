"""Plain-PyTorch references, shared by the tests and the benchmarks. They compute in float64
(or the dtype asked for) and follow the documented semantics exactly, special values included."""
from __future__ import annotations

import torch


def merge_attention_states(outs: torch.Tensor, lses: torch.Tensor, dtype: torch.dtype = torch.float64):
    """Reference merge of stacked partial states ``outs (N, B, S, H, D)``, ``lses (N, B, H, S)``.
    Returns ``(out (B, S, H, D), lse (B, H, S))`` in `dtype`."""
    o = outs.to(dtype)
    lse = lses.to(dtype)
    m = lse.amax(dim=0)  # (B, H, S)
    empty = m == float("-inf")
    m_safe = torch.where(empty, torch.zeros_like(m), m)
    w = torch.exp(lse - m_safe)  # 0 for empty partials
    w = torch.where(lse == float("-inf"), torch.zeros_like(w), w)
    d = w.sum(dim=0)
    lse_out = torch.where(empty, m, m_safe + torch.log(d))
    # a NaN or +inf lse makes the row NaN
    bad = torch.isnan(lse).any(dim=0) | torch.isposinf(lse).any(dim=0)
    lse_out = torch.where(bad, torch.full_like(lse_out, float("nan")), lse_out)
    wn = torch.where(empty.unsqueeze(0), torch.zeros_like(w), w / torch.where(empty, torch.ones_like(d), d))
    wn = wn.permute(0, 1, 3, 2).unsqueeze(-1)  # (N, B, S, H, 1)
    # empty partials (lse = -inf) must not contribute even if their outputs are NaN
    skip = (lse == float("-inf")).permute(0, 1, 3, 2).unsqueeze(-1)
    contrib = torch.where(skip, torch.zeros_like(o), wn * o)
    out = contrib.sum(dim=0)
    out = torch.where(bad.permute(0, 2, 1).unsqueeze(-1), torch.full_like(out, float("nan")), out)
    return out, lse_out


def merge_attention_states_torch(outs: torch.Tensor, lses: torch.Tensor):
    """The same math written with ordinary torch ops in the input dtype (the benchmark baseline
    and what a PyTorch user would write): no special-value care."""
    lse = torch.logsumexp(lses, dim=0)
    w = torch.exp(lses - lse.unsqueeze(0)).permute(0, 1, 3, 2).unsqueeze(-1)
    out = (w * outs.float()).sum(dim=0).to(outs.dtype)
    return out, lse


# ------------------------------------------------------------------ KV-cache decode attention
def gather_kv(cache: torch.Tensor, cache_seqlen: int, b: int, block_table: torch.Tensor | None = None) -> torch.Tensor:
    """The first `cache_seqlen` tokens of sequence `b` of a contiguous ``(batch, capacity, H, D)``
    or paged ``(num_pages, page_size, H, D)`` cache, as ``(cache_seqlen, H, D)``."""
    if block_table is None:
        return cache[b, :cache_seqlen]
    page_size = cache.shape[1]
    t = torch.arange(cache_seqlen, device=cache.device)
    pages = block_table[b].long()[t // page_size]
    return cache[pages, t % page_size]


def decode_attention(
    q, k_cache, v_cache, cache_seqlens, *, block_table=None, causal=True, window=(-1, -1), softmax_scale=None,
    softcap=0.0, alibi_slopes=None, dtype=torch.float64,
):
    """Reference decode attention (see genkernels.decode_attention) computed in `dtype`.
    Returns ``(out (B, Sq, Hq, D), lse (B, Hq, Sq))``; fully masked rows give 0 and -inf."""
    B, Sq, Hq, D = q.shape
    scale = D**-0.5 if softmax_scale is None else softmax_scale
    out = torch.zeros(B, Sq, Hq, D, dtype=dtype, device=q.device)
    lse = torch.full((B, Hq, Sq), float("-inf"), dtype=dtype, device=q.device)
    for b in range(B):
        L = int(cache_seqlens[b])
        if L == 0:
            continue
        # a decode step is prefill attention of Sq queries over the sequence's L cached keys
        slopes = None
        if alibi_slopes is not None:
            slopes = alibi_slopes[b] if alibi_slopes.dim() == 2 else alibi_slopes
        out[b], lse[b] = _flash_one_sequence(
            q[b], gather_kv(k_cache, L, b, block_table), gather_kv(v_cache, L, b, block_table),
            causal=causal, window=tuple(window), scale=scale, softcap=softcap, slopes=slopes, dtype=dtype,
        )  # fmt: skip
    return out, lse


def apply_rotary(x, cos, sin, positions, *, interleaved=False, dtype=torch.float64):
    """Reference rotary embedding of ``x (B, S, H, D)`` at ``positions (B, S)`` with tables
    ``cos``/``sin`` ``(P, rotary_dim / 2)``; dims from rotary_dim on pass through."""
    rd = cos.shape[1] * 2
    xd = x.to(dtype)
    c = cos.to(dtype)[positions.long()][:, :, None, :]  # (B, S, 1, rd/2)
    s = sin.to(dtype)[positions.long()][:, :, None, :]
    if interleaved:
        x0, x1 = xd[..., 0:rd:2], xd[..., 1:rd:2]
        r0, r1 = x0 * c - x1 * s, x0 * s + x1 * c
        rot = torch.stack((r0, r1), dim=-1).flatten(-2)
    else:
        x0, x1 = xd[..., : rd // 2], xd[..., rd // 2 : rd]
        rot = torch.cat((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1)
    return torch.cat((rot, xd[..., rd:]), dim=-1)


# ------------------------------------------------------------------ flash attention (prefill)
def _flash_one_sequence(q, k, v, *, causal, window, scale, softcap, slopes, dtype):
    """One sequence: q ``(Sq, Hq, D)``, k/v ``(Sk, Hkv, D)``, slopes ``(Hq,)`` or None.
    Returns ``(out (Sq, Hq, D), lse (Hq, Sq))`` in `dtype`."""
    sq, hq, d = q.shape
    sk, hkv = k.shape[0], k.shape[1]
    kk = k.to(dtype).repeat_interleave(hq // hkv, dim=1)
    vv = v.to(dtype).repeat_interleave(hq // hkv, dim=1)
    s = torch.einsum("shd,thd->hst", q.to(dtype), kk) * scale  # (Hq, Sq, Sk)
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    pos_q = torch.arange(sq, device=q.device) + sk - sq  # bottom-right alignment
    rel = torch.arange(sk, device=q.device)[None, :] - pos_q[:, None]  # key minus query position
    if slopes is not None:
        s = s - slopes.to(dtype)[:, None, None] * rel.abs().to(dtype)[None]
    left, right = window
    if causal:
        right = 0
    visible = torch.ones_like(rel, dtype=torch.bool)
    if left >= 0:
        visible &= rel >= -left
    if right >= 0:
        visible &= rel <= right
    s = s.masked_fill(~visible[None], float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # -inf where a row sees nothing
    empty = lse == float("-inf")
    p = torch.exp(s - torch.where(empty, torch.zeros_like(lse), lse)[..., None])
    p = torch.where(empty[..., None], torch.zeros_like(p), p)
    return torch.einsum("hst,thd->shd", p, vv), lse


def flash_attention(
    q, k, v, *, causal=False, window=(-1, -1), softmax_scale=None, softcap=0.0, alibi_slopes=None,
    cu_seqlens_q=None, cu_seqlens_k=None, dtype=torch.float64,
):
    """Reference flash attention (see genkernels.flash_attention) computed in `dtype`, with
    FlashAttention-2 semantics: bottom-right causal alignment, inclusive window with -1 unbounded,
    softcap before ALiBi (``-slope * |i + Sk - Sq - j|``), GQA. Dense inputs ``(B, S, H, D)`` give
    ``(out (B, Sq, Hq, D), lse (B, Hq, Sq))``; with cu_seqlens, packed ``(total, H, D)`` inputs give
    ``(out (total_q, Hq, D), lse (Hq, total_q))``. Fully masked rows: output 0, lse -inf."""
    d = q.shape[-1]
    scale = d**-0.5 if softmax_scale is None else softmax_scale
    opts = dict(causal=causal, window=tuple(window), scale=scale, softcap=softcap, dtype=dtype)

    def slopes_of(b):
        if alibi_slopes is None:
            return None
        return alibi_slopes[b] if alibi_slopes.dim() == 2 else alibi_slopes

    if cu_seqlens_q is None:
        outs, lses = [], []
        for b in range(q.shape[0]):
            o, l = _flash_one_sequence(q[b], k[b], v[b], slopes=slopes_of(b), **opts)
            outs.append(o)
            lses.append(l)
        if not outs:
            return q.new_zeros(q.shape, dtype=dtype), q.new_zeros((0, q.shape[2], q.shape[1]), dtype=dtype)
        return torch.stack(outs), torch.stack(lses)
    out = torch.zeros(q.shape, dtype=dtype, device=q.device)
    lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=dtype, device=q.device)
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for b in range(len(cq) - 1):
        o, l = _flash_one_sequence(
            q[cq[b] : cq[b + 1]], k[ck[b] : ck[b + 1]], v[ck[b] : ck[b + 1]], slopes=slopes_of(b), **opts
        )
        out[cq[b] : cq[b + 1]] = o
        lse[:, cq[b] : cq[b + 1]] = l
    return out, lse


# ------------------------------------------------------------------ diffusion sampler steps (float64)
from .diffusion import reference as diffusion  # noqa: E402  (genkernels.reference.diffusion.ddim_step, ...)
