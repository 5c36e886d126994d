"""`splice demo`: a short real benchmark (or `--synthetic`, the synthetic merge demo)."""

from __future__ import annotations

import argparse


def _cmd_demo(args: argparse.Namespace) -> int:
    from splice.demo import run_bench_demo, run_demo

    (run_demo if args.synthetic else run_bench_demo)(args.out, progress=not args.quiet)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    d = sub.add_parser(
        "demo",
        help="a short real benchmark: MiniLM experts on 3 tasks, merged with the core "
        "methods, accuracy table and plots (--synthetic: the synthetic Llama merge demo)",
    )
    d.add_argument(
        "--synthetic",
        action="store_true",
        help="instead: a small Llama-shaped model and 3 fine-tunes (no data, no download)",
    )
    d.add_argument("--out", default="splice-demo", help="work folder (splice-demo)")
    d.add_argument("--quiet", action="store_true")
    d.set_defaults(fn=_cmd_demo)
