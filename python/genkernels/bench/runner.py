"""Runs registered cases and reports them: rows, the printed table, JSON and scaling plots."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable

import torch

from . import timing
from .registry import Case


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def build_input_sets(case: Case, device: torch.device, llc_bytes: int, seed: int = 0) -> list[tuple]:
    gen = torch.Generator().manual_seed(seed)
    first = case.make_inputs(device, gen)
    if not case.cold:
        return [first]
    set_bytes = timing.tensor_bytes(first)
    n = timing.input_sets_needed(min(set_bytes, case.read_bytes) if case.read_bytes > 0 else set_bytes, llc_bytes)
    return [first] + [case.make_inputs(device, gen) for _ in range(n - 1)]


def run_case(case: Case, device: torch.device, repeats: int, peaks: dict, llc_bytes: int) -> dict:
    sets = build_input_sets(case, device, llc_bytes)
    # the op, its baseline and its companions take turns batch by batch (same machine state)
    fns = [case.genkernels, *([case.baseline] if case.baseline else []), *(c.fn for c in case.companions)]
    samples = timing.measure_interleaved(fns, sets, device, repeats)
    ours = samples[0]
    theirs = samples[1] if case.baseline else None
    n_sets = len(sets)
    del sets
    t_ours = timing.median(ours)
    companions = []
    for c, s in zip(case.companions, samples[2 if case.baseline else 1:]):
        t_c = timing.median(s)
        companions.append({
            "label": c.label, "report": c.report, "us": t_c * 1e6, "samples_us": [t * 1e6 for t in s],
            # "time": the op's time over the companion's; "rate": the op's rate over the companion's
            "ratio": timing.paired_ratio(ours, s) if c.report == "time" else timing.paired_ratio(s, ours),
        })  # fmt: skip
    t_base = timing.median(theirs) if theirs else None
    peak, unit = timing.peak_for(case.bound, case.dtype, peaks)
    rate = None
    if case.bound == "compute" and case.flops:
        rate = case.flops / t_ours / 1e9
    elif case.bound == "memory" and case.bytes_moved:
        rate = case.bytes_moved / t_ours / 1e9
    return {
        "name": case.name,
        "suite": case.suite,
        "op": case.op,
        "shape": case.shape,
        "dtype": case.dtype_name,
        "size": case.size,
        "bound": case.bound,
        "bytes_moved": case.bytes_moved,
        "flops": case.flops,
        "genkernels_us": t_ours * 1e6,
        "baseline_us": None if t_base is None else t_base * 1e6,
        "baseline": case.baseline_label if case.baseline else None,
        "speedup": None if t_base is None else timing.paired_ratio(theirs, ours),
        "rate": rate,
        "rate_unit": unit,
        "fraction_of_peak": None if rate is None else rate / peak,
        "genkernels_samples_us": [t * 1e6 for t in ours],
        "baseline_samples_us": None if theirs is None else [t * 1e6 for t in theirs],
        "companions": companions,
        "input_sets": n_sets,
        "repeats": repeats,
        "note": case.note,
    }


def run(
    cases: list[Case],
    device: torch.device,
    repeats: int,
    peaks: dict,
    progress: Callable[[str], None] | None = None,
) -> list[dict]:
    llc = timing.last_level_cache_bytes(device)
    rows = []
    for i, case in enumerate(cases, 1):
        if progress:
            progress(f"[{i}/{len(cases)}] {case.op} {case.shape} {case.dtype_name} ...")
        rows.append(run_case(case, device, repeats, peaks, llc))
    return rows


def stderr_progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------ output
def _fmt_us(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.1f}" if v < 1000 else f"{v:,.0f}"


def format_companion(c: dict) -> str:
    """``"91% of torch.sum"`` (a rate fraction) or ``"1.04x contiguous"`` (a time ratio)."""
    if c["report"] == "rate":
        return f"{100 * c['ratio']:.0f}% of {c['label']}"
    return f"{c['ratio']:.2f}x {c['label']}"


def format_table(rows: list[dict]) -> str:
    head = ["op", "shape", "dtype", "genkernels us", "torch us", "speedup", "GB/s|GFLOP/s", "% peak"]
    numbers = range(3, len(head))  # right-aligned; the text columns around them left-aligned
    refs = any(r.get("companions") for r in rows)
    if refs:
        head.append("same-loop refs")
    body = []
    for r in rows:
        rate = "-" if r["rate"] is None else f"{r['rate']:.1f} {'GB/s' if r['rate_unit'] == 'GB/s' else 'GFLOP/s'}"
        body.append([
            r["op"], r["shape"], r["dtype"], _fmt_us(r["genkernels_us"]), _fmt_us(r["baseline_us"]),
            "-" if r["speedup"] is None else f"{r['speedup']:.2f}x", rate,
            "-" if r["fraction_of_peak"] is None else f"{100 * r['fraction_of_peak']:.0f}%",
        ])  # fmt: skip
        if refs:
            body[-1].append("; ".join(map(format_companion, r.get("companions") or [])) or "-")
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]

    def fmt(cells):
        return "  ".join(c.rjust(w) if i in numbers else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return "\n".join([fmt(head), "  ".join("-" * w for w in widths), *map(fmt, body)])


def format_peaks(peaks: dict, device: torch.device) -> str:
    text = (
        f"device {device}; measured peaks: copy {peaks['copy_gbps']:.1f} GB/s (read+write), "
        f"read {peaks['read_gbps']:.1f} GB/s, GEMM (fp32) {peaks['gemm_fp32_gflops']:.0f} GFLOP/s, "
        f"GEMM (bf16) {peaks['gemm_bf16_gflops']:.0f} GFLOP/s"
    )
    if peaks.get("fma_fp32_gflops"):
        text += (
            f", FMA (fp32) {peaks['fma_fp32_gflops']:.0f} GFLOP/s, bf16 dot {peaks.get('dot_bf16_gflops', 0):.0f} GFLOP/s;"
            " % peak is of copy bandwidth for memory-bound ops, of the FMA (fp32) or bf16 dot-product"
            " peak for compute-bound ones"
        )
    else:
        text += "; % peak is of copy bandwidth for memory-bound ops, of the dtype's GEMM peak for compute-bound ones"
    return text


def write_json(path: Path, rows: list[dict], peaks: dict, device: torch.device, machine: dict, argv: list[str]) -> None:
    doc = {"device": str(device), "machine": machine, "peaks": peaks, "argv": argv, "rows": rows}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2))


def write_plot(path: Path, rows: list[dict]) -> None:
    """Time against problem size (tokens) per op, log-log, one line per dtype and implementation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ops = [op for op in dict.fromkeys(r["op"] for r in rows) if sum(1 for r in rows if r["op"] == op) > 1]
    ops = ops or list(dict.fromkeys(r["op"] for r in rows))
    fig, axes = plt.subplots(1, len(ops), figsize=(5.5 * len(ops), 4.2), squeeze=False)
    for ax, op in zip(axes[0], ops):
        mine = [r for r in rows if r["op"] == op]
        for dtype in dict.fromkeys(r["dtype"] for r in mine):
            pts = sorted((r for r in mine if r["dtype"] == dtype), key=lambda r: (r["size"], r["bytes_moved"]))
            x = [max(r["size"], 1) for r in pts]
            ax.plot(x, [r["genkernels_us"] for r in pts], "o-", label=f"genkernels {dtype}")
            if any(r["baseline_us"] is not None for r in pts):
                ax.plot(x, [r["baseline_us"] for r in pts], "s--", label=f"{pts[0]['baseline']} {dtype}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("batch x seqlen (tokens)")
        ax.set_ylabel("median time (us)")
        ax.set_title(op)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
