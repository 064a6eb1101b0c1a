"""Argument checks shared by every op. They raise ``TypeError`` (wrong type or dtype) or
``ValueError`` (wrong shape, device, layout or value) naming the argument, before any pointer
reaches native code. They only read metadata, so they work on fake tensors under
``torch.compile`` and never synchronise a GPU."""
from __future__ import annotations

import math
import numbers
from typing import Iterable, Sequence

import numpy
import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _dtype_names(dtypes: Iterable[torch.dtype]) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def check_tensor(
    name: str,
    t: object,
    *,
    ndim: int | None = None,
    dtypes: Sequence[torch.dtype] | None = None,
    last_dim_contiguous: bool = False,
    contiguous: bool = False,
) -> torch.Tensor:
    # Cheap attribute reads only (is_cpu/is_cuda, not t.device.type): ops call this on every
    # decode step, where the wrapper's overhead is a measured figure.
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype {_dtype_names(dtypes)}, got {str(t.dtype).replace('torch.', '')}")
    if not (t.is_cpu or t.is_cuda):
        raise ValueError(f"{name} is on device {t.device}; genkernels supports cpu and cuda tensors")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (strides {t.stride()} for shape {tuple(t.shape)})")
    if last_dim_contiguous and t.dim() > 0 and t.stride()[-1] != 1 and t.shape[-1] > 1:
        raise ValueError(f"{name} must have a contiguous last dimension (stride(-1) == 1), got strides {t.stride()}")
    return t


def check_flag(name: str, value: object) -> bool:
    """A bool option: a Python or NumPy bool, the int 0 or 1, or a one-element bool tensor (such
    as diffusers' ``t > 0``). A string there is a mistake that ``bool(value)`` would silently
    turn into True."""
    if type(value) is bool:
        return value
    if isinstance(value, numpy.bool_) or (isinstance(value, int) and value in (0, 1)):
        return bool(value)
    if isinstance(value, torch.Tensor) and value.dtype == torch.bool and value.numel() == 1:
        return bool(value)
    raise TypeError(f"{name} must be a bool, got {value!r}")


def check_number(name: str, value: object) -> float:
    """A real-valued scalar option (int, float, NumPy scalar or one-element tensor such as a
    scheduler's ``sigmas[i]``; not a bool or a string), as a float."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.dtype.is_complex:
        return float(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {value!r}")
    return float(value)


def check_int(name: str, value: object) -> int:
    """An integer option (int or NumPy integer, not a bool or a float)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r}")
    return int(value)


def check_softmax_scale(value: object) -> float:
    """An explicit ``softmax_scale`` (attention ops; None is resolved by the caller): a finite
    int or float. NaN or inf would turn every score into NaN."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"softmax_scale must be a finite float or None, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"softmax_scale must be a finite float or None, got {value!r}")
    return float(value)


def check_softcap(softcap: float) -> None:
    """``softcap`` of the attention ops (already a float): 0 (none) or a finite cap. NaN fails
    too; an infinite cap would give inf * tanh(s / inf) = inf * 0 = NaN scores."""
    if not 0.0 <= softcap < math.inf:
        raise ValueError(f"softcap must be a finite float >= 0 (0: none), got {softcap}")


def require_tensors(**args: object) -> None:
    """The cheap type check a public function does before calling its torch op, whose schema
    would otherwise reject a non-tensor with a less helpful RuntimeError."""
    for name, t in args.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def check_shape(name: str, t: torch.Tensor, expected: Sequence[int], what: str = "") -> None:
    if tuple(t.shape) != tuple(expected):
        hint = f" ({what})" if what else ""
        raise ValueError(f"{name} must have shape {tuple(expected)}{hint}, got {tuple(t.shape)}")


def check_same_device(**tensors: torch.Tensor | None) -> None:
    items = [(n, t) for n, t in tensors.items() if t is not None]
    first_name, first = items[0]
    dev = first.get_device()  # -1 for CPU, the index for CUDA: an int, cheaper than t.device
    for n, t in items[1:]:
        if t.get_device() != dev or t.is_cuda != first.is_cuda:
            raise ValueError(f"{n} is on {t.device} but {first_name} is on {first.device}; all tensors must be on one device")


def check_same_dtype(**tensors: torch.Tensor) -> torch.dtype:
    items = list(tensors.items())
    dt = items[0][1].dtype
    for n, t in items[1:]:
        if t.dtype != dt:
            raise TypeError(f"{n} has dtype {t.dtype} but {items[0][0]} has {dt}; they must match")
    return dt


def _span(t: torch.Tensor) -> tuple[int, int]:
    """[first byte, last byte + 1) that a strided tensor can touch."""
    if t.numel() == 0:
        return (0, 0)
    lo = hi = t.data_ptr()
    for size, stride in zip(t.shape, t.stride()):
        ext = (size - 1) * stride * t.element_size()
        lo, hi = (lo + ext, hi) if ext < 0 else (lo, hi + ext)
    return lo, hi + t.element_size()


def check_no_overlap(name: str, t: torch.Tensor, **inputs: torch.Tensor) -> None:
    """An output buffer must not share memory with an input (the result would be garbage)."""
    a0, a1 = _span(t)
    for other_name, o in inputs.items():
        b0, b1 = _span(o)
        if a0 < b1 and b0 < a1 and a1 > a0 and b1 > b0:
            raise ValueError(f"{name} overlaps the memory of {other_name}; pass a separate buffer")
