#!/usr/bin/env python
"""Summarises several ``python -m genkernels.bench --json`` runs of the same cases (developer
tool): per case, the median over runs of the time, the rate, the speedup and each same-loop
ratio, with their range in brackets. On a shared host whose memory bandwidth drifts by 2x within
minutes, one run's row can land in a slow or fast spell; several runs show how far it moves.

    for i in 1 2 3; do python -m genkernels.bench decode --json /tmp/run$i.json; done
    python scripts/bench_runs.py /tmp/run*.json [--op decode_attention] [--split-rate 62]

A same-loop reference reported as a rate (torch.sum over the same bytes) also shows its own
rate, which tells the host's state during that row. ``--split-rate X`` prints two tables: the
rows whose reference read below X GB/s and those at or above it.
"""
from __future__ import annotations

import argparse
import json
import statistics


def _fmt(values: list[float], spec: str, suffix: str = "") -> str:
    mid = statistics.median(values)
    if len(values) == 1:
        return f"{mid:{spec}}{suffix}"
    return f"{mid:{spec}}{suffix} [{min(values):{spec}}-{max(values):{spec}}]"


def _companion_rate(row: dict, c: dict) -> float:
    """GB/s of same-loop reference ``c`` of ``row``, which reads the row's bytes."""
    return row["bytes_moved"] / c["us"] / 1e3


def reference_rate(row: dict) -> float | None:
    """GB/s of the row's first same-loop reference reported as a rate."""
    for c in row.get("companions", []):
        if c["report"] == "rate" and c["us"] > 0:
            return _companion_rate(row, c)
    return None


def summarise(docs: list[dict], op: str | None, keep=lambda row: True) -> str:
    by_name: dict[str, list[dict]] = {}
    for doc in docs:
        for row in doc["rows"]:
            if (op is None or row["op"] == op) and keep(row):
                by_name.setdefault(row["name"], []).append(row)
    peaks = [doc["peaks"].get("read_gbps") for doc in docs if doc["peaks"].get("read_gbps")]
    lines = [f"{len(docs)} runs; read peak at the start of each: " + ", ".join(f"{p:.1f}" for p in peaks) + " GB/s", ""]
    lines.append("| case | us | rate | speedup | same-loop refs |")
    lines.append("| --- | --- | --- | --- | --- |")
    for name, rows in by_name.items():
        rates = [r["rate"] for r in rows if r.get("rate")]
        speedups = [r["speedup"] for r in rows if r.get("speedup")]
        refs = []
        for label in dict.fromkeys(c["label"] for r in rows for c in r.get("companions", [])):
            cs = [c for r in rows for c in r["companions"] if c["label"] == label]
            if cs[0]["report"] == "rate":
                own = [_companion_rate(r, c) for r in rows for c in r["companions"] if c["label"] == label]
                refs.append(_fmt([100 * c["ratio"] for c in cs], ".0f", "%") + f" of {label} (" + _fmt(own, ".0f") + " GB/s)")
            else:
                refs.append(_fmt([c["ratio"] for c in cs], ".2f", "x") + f" {label}")
        lines.append(" | ".join([
            f"| {name}", _fmt([r["genkernels_us"] for r in rows], ",.0f"),
            _fmt(rates, ".1f", f" {rows[0]['rate_unit']}") if rates else "-",
            _fmt(speedups, ".2f", "x") if speedups else "-", "; ".join(refs) or "-",
        ]) + " |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("json", nargs="+", help="files written by python -m genkernels.bench --json")
    ap.add_argument("--op", help="only the rows of this op")
    ap.add_argument("--split-rate", type=float, metavar="GBPS",
                    help="two tables: rows whose same-loop rate reference read below / at or above GBPS")
    args = ap.parse_args()
    docs = []
    for path in args.json:
        with open(path) as f:
            docs.append(json.load(f))
    if args.split_rate is None:
        print(summarise(docs, args.op))
        return
    x = args.split_rate
    for title, keep in [(f"reference below {x:g} GB/s", lambda r: (reference_rate(r) or 0.0) < x),
                        (f"reference at or above {x:g} GB/s", lambda r: (reference_rate(r) or 0.0) >= x)]:
        print(f"## {title}\n")
        print(summarise(docs, args.op, keep) + "\n")


if __name__ == "__main__":
    main()
