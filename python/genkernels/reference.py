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
