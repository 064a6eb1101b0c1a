"""Test helpers: the CUDA-emulation switch and the one tolerance rule.

``emulate_cuda()``: inside it, ops on CPU tensors run their CUDA kernels through the
CUDA-on-CPU emulator (csrc/emu), so any test can compare a CUDA kernel with the reference and
with the CPU path on a machine without a GPU.

Tolerance rule (DESIGN.md, after flash-attention's tests): a kernel's error against the float64
reference may be at most twice the error of PyTorch's own computation in the same dtype, plus a
small floor from ``TOLERANCE_FLOOR``. NaN and infinities must match exactly.
"""
from __future__ import annotations

import contextlib

import torch

from . import _native

# The only tolerance constants in the test suite: an absolute floor per output dtype, for
# outputs of magnitude about 1, added to twice PyTorch's own error.
TOLERANCE_FLOOR = {torch.float32: 1e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3, torch.float64: 1e-12}


def has_emulation() -> bool:
    return bool(_native._C.build_info()["with_emulation"])


@contextlib.contextmanager
def emulate_cuda():
    """Runs the CUDA kernels of ops called on CPU tensors on the CPU emulator (this thread)."""
    if not has_emulation():
        raise RuntimeError("this build of genkernels has no CUDA emulation (built with GK_EMU=OFF)")
    old = _native.set_emulating(True)
    try:
        yield
    finally:
        _native.set_emulating(old)


@contextlib.contextmanager
def poison_outputs():
    """Fills every output genkernels allocates with NaN, so an element a kernel fails to
    write shows up as NaN in the comparison."""
    old = _native.set_poison_outputs(True)
    try:
        yield
    finally:
        _native.set_poison_outputs(old)


def _special_mask_check(name: str, out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    out_nan, ref_nan = torch.isnan(out), torch.isnan(ref)
    if not torch.equal(out_nan, ref_nan):
        idx = (out_nan != ref_nan).nonzero()[:5].tolist()
        raise AssertionError(f"{name}: NaN positions differ from the reference, first at {idx}")
    out_inf, ref_inf = torch.isinf(out), torch.isinf(ref)
    if not torch.equal(out_inf, ref_inf) or not torch.equal(out[out_inf], ref[ref_inf].to(out.dtype)):
        idx = (out_inf != ref_inf).nonzero()[:5].tolist()
        raise AssertionError(f"{name}: infinities differ from the reference, first at {idx}")
    return ~(ref_nan | torch.isinf(ref))


def max_abs_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    finite = torch.isfinite(ref)
    if not finite.any():
        return 0.0
    return (x.double()[finite] - ref.double()[finite]).abs().max().item()


def assert_close(name: str, out: torch.Tensor, ref: torch.Tensor, baseline: torch.Tensor | None = None) -> None:
    """Asserts the tolerance rule for `out` against the float64 `ref`, with `baseline` the same
    computation done by PyTorch in the output's dtype (None: exact-dtype comparison with only
    the floor). Prints the first mismatches on failure."""
    if out.shape != ref.shape:
        raise AssertionError(f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}")
    finite = _special_mask_check(name, out, ref)
    err = (out.double() - ref.double()).abs()
    err = torch.where(finite, err, torch.zeros_like(err))
    base_err = 0.0 if baseline is None else max_abs_error(baseline, ref)
    tol = 2.0 * base_err + TOLERANCE_FLOOR[out.dtype] * max(1.0, ref[finite].abs().max().item() if finite.any() else 1.0)
    worst = err.max().item() if err.numel() else 0.0
    if worst > tol:
        bad = (err > tol).nonzero()[:5]
        rows = [f"  at {tuple(i)}: got {out[tuple(i)].item():.6g}, want {ref[tuple(i)].item():.6g}" for i in bad.tolist()]
        raise AssertionError(
            f"{name}: max |error| {worst:.3g} > tolerance {tol:.3g} (PyTorch's own error {base_err:.3g})\n" + "\n".join(rows)
        )
