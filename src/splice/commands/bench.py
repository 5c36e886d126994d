"""`splice bench CONFIG`: train (or reuse, cached by content hash) one expert per task and kind,
merge their backbones with every applicable method (defaults and a validation sweep), evaluate on
every task's test split; write a table, JSON and plots."""

from __future__ import annotations

import argparse
from pathlib import Path

from splice.commands._flags import add_ray_flag


def _run(args: argparse.Namespace) -> int:
    from splice.bench import load_bench_config, run_bench
    from splice.bench.report import print_results

    cfg = load_bench_config(args.config)
    if args.threads:
        cfg = cfg.model_copy(update={"threads": args.threads})
    results = run_bench(cfg, args.out, progress=not args.quiet, ray=args.ray)
    if hasattr(results, "timing"):
        print_results(results, args.out)
    else:  # a causal-LM pool (splice.bench.lm_run)
        print(f"\n{(Path(args.out) / 'results.md').read_text()}results in {args.out}/")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="fine-tune experts on real tasks, merge them with every method, evaluate",
        description=__doc__,
    )
    p.add_argument("config", help="bench config YAML (see splice.bench.config)")
    p.add_argument("--out", default="splice-bench", help="output folder (splice-bench)")
    p.add_argument(
        "--threads", type=int, help="torch CPU threads (overrides the config; with --ray: per task)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_ray_flag(p, "the expert training and the merges")
    p.set_defaults(fn=_run)
