"""Timing and this machine's measured peaks.

A measurement is the median over `repeats` of one timed batch of calls; each batch runs enough
calls to last about ``MIN_BATCH_S`` (so a microsecond op is not lost in the clock), rotating
over input sets whose total exceeds the last-level cache, so every call reads from DRAM as a
real model's would. Untimed calls of the same fn (``SETTLE_S``) precede each timed batch. CUDA
timings synchronise the device before and after each batch."""
from __future__ import annotations

import math
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch

MIN_BATCH_S = 2e-3
# Untimed calls of a fn before each of its timed batches, lasting about this long: a batch that
# follows a compute-heavy one starts slow on this host (the decode kernel's first call after
# PyTorch's folded SDPA +13%, the next three +3-7%), which biased same-loop ratios against
# whichever fn the interleaving put after the baseline (a paged decode measured 1.08-1.10x its
# contiguous companion, 1.01-1.03x in orders where neither followed the baseline). Fns whose
# calls take 10x longer get none: the effect is under 1% of one call.
SETTLE_S = 5e-3
MAX_INPUT_SETS = 256
DEFAULT_LLC_BYTES = 32 << 20
LLC_SPAN = 8  # input sets span this many last-level caches


def last_level_cache_bytes(device: torch.device) -> int:
    """L2 of the GPU, or the largest CPU cache in sysfs (32 MiB if unknown)."""
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", DEFAULT_LLC_BYTES))
    best = 0
    for size_file in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = size_file.read_text().strip().upper()
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        try:
            best = max(best, int(text.rstrip("KMG")) * scale)
        except ValueError:
            pass
    return best or DEFAULT_LLC_BYTES


def input_sets_needed(bytes_per_set: int, llc_bytes: int) -> int:
    """How many input sets to rotate over so that they span ``LLC_SPAN`` times the last-level
    cache. Twice was not enough here: over a 64 MiB rotation (two 32 MiB decode caches),
    ``torch.sum`` read at about 1.8x the DRAM bandwidth, so the 32 MiB L3 kept part of it
    (presumably a thrash-resistant replacement policy). Four was not quite enough either: the
    decode kernel re-reading a 32 MiB cache after 3 others (96 MiB) ran 7% faster than after 7
    or 9 others, which measured the same (interleaved, same process)."""
    if bytes_per_set <= 0:
        return 1
    return max(1, min(MAX_INPUT_SETS, math.ceil(LLC_SPAN * llc_bytes / bytes_per_set)))


def tensor_bytes(obj: Any) -> int:
    """Bytes of memory under the tensors in ``obj`` (nested tuples / lists), each byte once: a
    tensor passed twice, or overlapping views of one buffer, count once; a tensor spans numel x
    element size bytes from its first element (exact for dense tensors). (Counting each tensor
    made the contiguous decode cases, whose inputs name the cache twice, rotate over half the
    intended span, so that part of their reads came from L3.)"""
    spans: list[tuple[str, int, int]] = []

    def walk(o: Any) -> None:
        if isinstance(o, torch.Tensor):
            if o.numel():
                start = o.data_ptr()
                spans.append((str(o.device), start, start + o.numel() * o.element_size()))
        elif isinstance(o, (tuple, list)):
            for x in o:
                walk(x)

    walk(obj)
    total, cur = 0, None  # union of the [start, end) spans, per device
    for dev, lo, hi in sorted(spans):
        if cur and cur[0] == dev and lo <= cur[2]:
            cur = (dev, cur[1], max(cur[2], hi))
            continue
        if cur:
            total += cur[2] - cur[1]
        cur = (dev, lo, hi)
    return total + (cur[2] - cur[1] if cur else 0)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    fn: Callable[..., Any],
    arg_sets: list[tuple],
    device: torch.device,
    repeats: int,
    warmup: int = 2,
) -> list[float]:
    """Seconds per call of ``fn(*args)``, one value per repeat (take the median)."""
    return measure_interleaved([fn], arg_sets, device, repeats, warmup)[0]


def measure_interleaved(
    fns: list[Callable[..., Any]],
    arg_sets: list[tuple],
    device: torch.device,
    repeats: int,
    warmup: int = 2,
) -> list[list[float]]:
    """Seconds per call of each ``fn(*args)``, one value per repeat for each fn.

    The fns take turns batch by batch (repeat r times a batch of each, in list order on even
    repeats and reversed on odd ones), so every fn sees the same machine state: on a shared
    host, memory bandwidth drifts by up to 2x within minutes, which makes ratios of separately
    timed runs meaningless. Each timed batch comes after untimed calls of the same fn
    (``settle_calls``), so that no fn's batch pays for the one before it. One rotation over the
    input sets is shared by all fns (untimed calls included), so no call finds the inputs a
    previous call just read still in the cache."""
    n_sets = len(arg_sets)
    k = 0
    calls, settle = [], []
    for fn in fns:
        per_call = math.inf  # the fastest warm-up call sizes the batches (the first one is cold)
        for _ in range(max(2, warmup)):
            _sync(device)
            t0 = time.perf_counter()
            fn(*arg_sets[k])
            _sync(device)
            per_call = min(per_call, time.perf_counter() - t0)
            k = k + 1 if k + 1 < n_sets else 0
        calls.append(max(1, min(100_000, int(MIN_BATCH_S / max(per_call, 1e-9)))))
        settle.append(settle_calls(per_call))
    samples: list[list[float]] = [[] for _ in fns]
    for r in range(repeats):
        order = range(len(fns)) if r % 2 == 0 else reversed(range(len(fns)))
        for i in order:
            fn = fns[i]
            for _ in range(settle[i]):
                fn(*arg_sets[k])
                k = k + 1 if k + 1 < n_sets else 0
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(calls[i]):
                fn(*arg_sets[k])
                k = k + 1 if k + 1 < n_sets else 0
            _sync(device)
            samples[i].append((time.perf_counter() - t0) / calls[i])
    return samples


def settle_calls(per_call: float) -> int:
    """Untimed calls before a timed batch of a fn whose calls take ``per_call`` seconds: about
    ``SETTLE_S`` of them, at least one, none for calls of ``10 * SETTLE_S`` or more."""
    if per_call >= 10 * SETTLE_S:
        return 0
    return max(1, min(100_000, math.ceil(SETTLE_S / max(per_call, 1e-9))))


def median(samples: list[float]) -> float:
    return statistics.median(samples)


def paired_ratio(num: list[float], den: list[float]) -> float:
    """Median over repeats of num[i] / den[i], for two series from ``measure_interleaved`` (sample
    i of each was timed in the same repeat, a batch apart): the machine's drift during a case
    moves both sides of a pair alike, where a ratio of the two medians can pair a fast repeat of
    one with a slow repeat of the other."""
    if len(num) != len(den) or not num:
        raise ValueError(f"paired_ratio needs two series of equal, nonzero length (got {len(num)} and {len(den)})")
    return statistics.median(n / d for n, d in zip(num, den))


def measure_peaks(device: torch.device, quick: bool = False, repeats: int = 5) -> dict[str, float]:
    """This machine's ceilings, measured with torch:

    - ``copy_gbps``: ``dst.copy_(src)`` of a large fp32 buffer, read + write bytes counted;
    - ``read_gbps``: ``torch.sum`` of a large fp32 tensor (read only);
    - ``gemm_fp32_gflops`` / ``gemm_bf16_gflops``: a square ``torch.mm`` (2048, 1024 with
      --quick), which MKL/oneDNN or cuBLAS run near the FMA peak of the dtype;
    - on the CPU, ``fma_fp32_gflops`` and ``dot_bf16_gflops``: genkernels' own probes (12
      independent FMA / vdpbf16ps chains per thread at the active ISA level, all threads; the
      best of a few runs, as a peak is the best the machine can do). These are the
      denominators of compute-bound fractions on the CPU; the GEMMs are shown for context."""
    mib = 64 if quick else 256
    n = (mib << 20) // 4
    src = torch.empty(n, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    copy_s = median(measure(lambda: dst.copy_(src), [()], device, repeats, warmup=1))
    read_s = median(measure(lambda: torch.sum(src), [()], device, repeats, warmup=1))
    del src, dst
    peaks = {
        "buffer_mib": float(mib),
        "copy_gbps": 2 * n * 4 / copy_s / 1e9,
        "read_gbps": n * 4 / read_s / 1e9,
    }
    size = 1024 if quick else 2048
    for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a = torch.randn(size, size, device=device).to(dt)
        b = torch.randn(size, size, device=device).to(dt)
        s = median(measure(lambda: torch.mm(a, b), [()], device, max(3, repeats // 2), warmup=1))
        peaks[f"gemm_{name}_gflops"] = 2 * size**3 / s / 1e9
    peaks["gemm_size"] = float(size)
    if device.type == "cpu":
        from .. import _native

        threads, iters = _native.num_threads(), (2_000_000 if quick else 20_000_000)
        for key, kind in (("fma_fp32_gflops", 0), ("dot_bf16_gflops", 1)):
            peaks[key] = max(_native._C.cpu_peak_gflops(kind, threads, iters) for _ in range(3))
    return peaks


def peak_for(bound: str, dtype: torch.dtype, peaks: dict[str, float]) -> tuple[float, str]:
    """The denominator of a case's fraction of peak, and its unit."""
    if bound == "compute":
        low = dtype in (torch.bfloat16, torch.float16)
        if peaks.get("fma_fp32_gflops"):  # CPU: the measured instruction peaks
            key = "dot_bf16_gflops" if low and peaks.get("dot_bf16_gflops") else "fma_fp32_gflops"
        else:
            key = "gemm_bf16_gflops" if low else "gemm_fp32_gflops"
        return peaks[key], "GFLOP/s"
    return peaks["copy_gbps"], "GB/s"
