"""Merging partial attention states: the log-sum-exp weighted combine behind split-KV decode,
cascade attention and ring attention.

A partial state of a row is its normalised attention output ``o`` (over a subset of the keys)
and the natural-log log-sum-exp ``lse`` of that subset's scores. Merging partials gives the
output and log-sum-exp over the union of the subsets::

    lse = log(sum_i exp(lse_i))        out = sum_i exp(lse_i - lse) * o_i

Special values: a partial with ``lse = -inf`` is empty and contributes nothing, whatever its
output holds; if every partial is empty the output is 0 and the lse ``-inf`` (never NaN). A NaN
or ``+inf`` lse is not hidden: that row's output and lse become NaN.
"""
from __future__ import annotations

import torch

from . import _native
from ._checks import (
    FLOAT_DTYPES,
    check_no_overlap,
    check_same_device,
    check_same_dtype,
    check_shape,
    check_tensor,
    require_tensors,
)


def merge_attention_states(
    out_a: torch.Tensor,
    lse_a: torch.Tensor,
    out_b: torch.Tensor,
    lse_b: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
    lse_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merges two partial attention states.

    Args:
        out_a, out_b: ``(batch, seqlen, heads, head_dim)`` float32, float16 or bfloat16, the same
            dtype; any strides with a contiguous last dimension.
        lse_a, lse_b: ``(batch, heads, seqlen)`` float32 natural-log log-sum-exp.

        out, lse_out: optional preallocated contiguous outputs (written in place and returned),
            for loops that should not allocate; they must not overlap the inputs.

    Returns:
        ``(out, lse)``: ``out`` contiguous ``(batch, seqlen, heads, head_dim)`` in the input dtype
        (accumulated in float32), ``lse`` float32 ``(batch, heads, seqlen)``.
    """
    require_tensors(out_a=out_a, lse_a=lse_a, out_b=out_b, lse_b=lse_b)
    if out is None and lse_out is None:
        return torch.ops.genkernels.merge_attention_states(out_a, lse_a, out_b, lse_b)
    out, lse_out = _fill_missing(out_a, out, lse_out)
    torch.ops.genkernels.merge_attention_states_out(out_a, lse_a, out_b, lse_b, out, lse_out)
    return out, lse_out


def merge_attention_states_n(
    outs: torch.Tensor, lses: torch.Tensor, *, out: torch.Tensor | None = None, lse_out: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merges ``N`` stacked partial states: ``outs`` ``(N, batch, seqlen, heads, head_dim)`` and
    ``lses`` ``(N, batch, heads, seqlen)`` float32. Same semantics, outputs and ``out=`` /
    ``lse_out=`` as :func:`merge_attention_states`."""
    require_tensors(outs=outs, lses=lses)
    if out is None and lse_out is None:
        return torch.ops.genkernels.merge_attention_states_n(outs, lses)
    out, lse_out = _fill_missing(outs, out, lse_out)
    torch.ops.genkernels.merge_attention_states_n_out(outs, lses, out, lse_out)
    return out, lse_out


# ------------------------------------------------------------------ implementation
def _check_partial(out_name: str, out: torch.Tensor, lse_name: str, lse: torch.Tensor, lead: int) -> None:
    check_tensor(out_name, out, ndim=4 + lead, dtypes=FLOAT_DTYPES, last_dim_contiguous=True)
    check_tensor(lse_name, lse, ndim=3 + lead, dtypes=(torch.float32,))
    *n, b, s, h, _ = out.shape
    check_shape(lse_name, lse, (*n, b, h, s), f"{'(N, ' if lead else '('}batch, heads, seqlen) of {out_name}")


def _validate_pair(out_a, lse_a, out_b, lse_b) -> None:
    _check_partial("out_a", out_a, "lse_a", lse_a, 0)
    _check_partial("out_b", out_b, "lse_b", lse_b, 0)
    check_shape("out_b", out_b, out_a.shape, "the shape of out_a")
    check_same_dtype(out_a=out_a, out_b=out_b)
    check_same_device(out_a=out_a, lse_a=lse_a, out_b=out_b, lse_b=lse_b)


def _validate_stacked(outs, lses) -> None:
    _check_partial("outs", outs, "lses", lses, 1)
    if outs.shape[0] < 1:
        raise ValueError("outs must hold at least one partial state (N >= 1)")
    check_same_device(outs=outs, lses=lses)


def _empty_outputs(out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    b, s, h, d = out.shape[-4:]
    return (
        _native.new_output((b, s, h, d), out.dtype, out.device),
        _native.new_output((b, h, s), torch.float32, out.device),
    )


def _fill_missing(partial, out, lse_out):
    if out is not None and lse_out is not None:
        return out, lse_out
    new_out, new_lse = _empty_outputs(partial)
    return (new_out if out is None else out), (new_lse if lse_out is None else lse_out)


def _check_destination(partial, out, lse_out) -> None:
    b, s, h, d = partial.shape[-4:]
    check_tensor("out", out, ndim=4, contiguous=True)
    check_tensor("lse_out", lse_out, ndim=3, dtypes=(torch.float32,), contiguous=True)
    check_shape("out", out, (b, s, h, d), "(batch, seqlen, heads, head_dim) of the partials")
    check_shape("lse_out", lse_out, (b, h, s), "(batch, heads, seqlen)")
    if out.dtype != partial.dtype:
        raise TypeError(f"out has dtype {out.dtype} but the partial outputs have {partial.dtype}; they must match")
    check_same_device(partials=partial, out=out, lse_out=lse_out)


def _check_no_overlap(out, lse_out, **inputs) -> None:
    # real tensors only: fake tensors under torch.compile have no memory to compare
    for name, t in (("out", out), ("lse_out", lse_out)):
        check_no_overlap(name, t, **inputs)
    check_no_overlap("out", out, lse_out=lse_out)


def _launch(first_out, first_lse, rest_out, rest_lse, n, out_pstride, lse_pstride, rest_out_st, rest_lse_st,
            dst_out=None, dst_lse=None):  # fmt: skip
    if dst_out is None:
        dst_out, dst_lse = _empty_outputs(first_out)
    b, s, h, d = first_out.shape
    fo, fl = first_out.stride(), first_lse.stride()
    _native._C.merge_attention_states(
        _native.device_code(first_out), _native.DTYPE_CODE[first_out.dtype],
        first_out.data_ptr(), rest_out, first_lse.data_ptr(), rest_lse,
        n, out_pstride, lse_pstride, b, s, h, d,
        fo[0], fo[1], fo[2], *rest_out_st, fl[0], fl[1], fl[2], *rest_lse_st,
        dst_out.data_ptr(), dst_lse.data_ptr(), _native.stream_of(first_out), _native.num_threads(),
    )  # fmt: skip
    return dst_out, dst_lse


def merge_pair_impl(out_a, lse_a, out_b, lse_b, dst_out=None, dst_lse=None):
    _validate_pair(out_a, lse_a, out_b, lse_b)
    ob, lb = out_b.stride(), lse_b.stride()
    return _launch(out_a, lse_a, out_b.data_ptr(), lse_b.data_ptr(), 2, 0, 0, ob[:3], lb[:3], dst_out, dst_lse)


def merge_pair_out_impl(out_a, lse_a, out_b, lse_b, out, lse_out) -> None:
    _validate_pair(out_a, lse_a, out_b, lse_b)
    _check_destination(out_a, out, lse_out)
    _check_no_overlap(out, lse_out, out_a=out_a, lse_a=lse_a, out_b=out_b, lse_b=lse_b)
    merge_pair_impl(out_a, lse_a, out_b, lse_b, out, lse_out)


def merge_pair_out_fake(out_a, lse_a, out_b, lse_b, out, lse_out) -> None:
    _validate_pair(out_a, lse_a, out_b, lse_b)
    _check_destination(out_a, out, lse_out)


def merge_pair_fake(out_a, lse_a, out_b, lse_b):
    _validate_pair(out_a, lse_a, out_b, lse_b)
    return _empty_outputs(out_a)


def merge_stacked_impl(outs, lses, dst_out=None, dst_lse=None):
    _validate_stacked(outs, lses)
    n = outs.shape[0]
    if n == 1:  # still a kernel call: it normalises an empty state to 0 and makes a copy
        return _launch(outs[0], lses[0], 0, 0, 1, 0, 0, (0, 0, 0), (0, 0, 0), dst_out, dst_lse)
    so, sl = outs.stride(), lses.stride()
    return _launch(outs[0], lses[0], outs[1].data_ptr(), lses[1].data_ptr(), n, so[0], sl[0], so[1:4], sl[1:4],
                   dst_out, dst_lse)  # fmt: skip


def merge_stacked_out_impl(outs, lses, out, lse_out) -> None:
    _validate_stacked(outs, lses)
    _check_destination(outs, out, lse_out)
    _check_no_overlap(out, lse_out, outs=outs, lses=lses)
    merge_stacked_impl(outs, lses, out, lse_out)


def merge_stacked_out_fake(outs, lses, out, lse_out) -> None:
    _validate_stacked(outs, lses)
    _check_destination(outs, out, lse_out)


def merge_stacked_fake(outs, lses):
    _validate_stacked(outs, lses)
    return _empty_outputs(outs)
