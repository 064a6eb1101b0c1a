"""``python -m genkernels.bench [suite-or-case ...]``: run the microbenchmarks, print a table.

Names select suites (``merge``), ops (``merge_attention_states_n``), tags (``overhead``) or
globs over case names (``'merge_attention_states/*bf16'``); none selects everything."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from . import registry, runner, timing


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(prog="python -m genkernels.bench", description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*", help="suites, ops, tags or case-name globs (default: all)")
    ap.add_argument("--json", type=Path, help="write every row, the peaks and genkernels.info() as JSON")
    ap.add_argument("--plot", type=Path, help="write a PNG of time against size per op")
    ap.add_argument("--repeats", type=int, help="timed repeats per case (default 10, 5 with --quick)")
    ap.add_argument("--quick", action="store_true", help="small cases only, fewer repeats, smaller peak probes")
    ap.add_argument("--list", action="store_true", help="list the selected cases and exit")
    ap.add_argument("--threads", type=int, help="CPU threads of torch and genkernels (default: torch's)")
    args = ap.parse_args(argv)

    if args.repeats is not None and args.repeats < 1:
        ap.error("--repeats must be at least 1")
    if args.threads is not None and args.threads < 1:
        ap.error("--threads must be at least 1")
    try:
        cases = registry.select(args.names, quick=args.quick)
    except ValueError as e:
        ap.error(str(e))
    if args.list:
        for c in cases:
            print(f"{c.suite:<10} {c.name}" + ("  [quick]" if c.quick else ""))
        return 0
    if not cases:
        print("no benchmark case selected", file=sys.stderr)
        return 1
    repeats = args.repeats if args.repeats is not None else (5 if args.quick else 10)

    import genkernels

    if args.threads is not None:
        torch.set_num_threads(args.threads)  # genkernels follows torch.get_num_threads()
    device = runner.default_device()
    machine = genkernels.info()
    print(f"measuring peaks on {device} ...", file=sys.stderr, flush=True)
    with torch.inference_mode():
        peaks = timing.measure_peaks(device, quick=args.quick)
        rows = runner.run(cases, device, repeats, peaks, progress=runner.stderr_progress)

    print(runner.format_peaks(peaks, device) + f"; {torch.get_num_threads()} CPU threads")
    print(f"median of {repeats} repeats; inputs rotated over > {timing.LLC_SPAN}x the last-level cache "
          f"({timing.last_level_cache_bytes(device) >> 20} MiB) except overhead cases; the op, its baseline"
          " and its same-loop refs are timed in alternating batches, and the speedup and same-loop ratios are"
          " medians of per-repeat ratios")  # fmt: skip
    print(runner.format_table(rows))
    for r in rows:
        if r["note"]:
            print(f"{r['op']}: {r['note']}")
    if args.json:
        runner.write_json(args.json, rows, peaks, device, machine, argv)
        print(f"wrote {args.json}", file=sys.stderr)
    if args.plot:
        runner.write_plot(args.plot, rows)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
