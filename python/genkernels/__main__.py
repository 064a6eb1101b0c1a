"""``python -m genkernels info``: print the runtime information."""
from __future__ import annotations

import argparse
import json


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m genkernels")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p_info = sub.add_parser("info", help="version, CUDA archs and GPU status, CPU ISA, threads")
    p_info.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    from .info import format_info, info

    if args.cmd == "info":
        print(json.dumps(info(), indent=2) if args.json else format_info())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
