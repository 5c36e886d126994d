#!/usr/bin/env python
"""Merge time and peak memory against model size: `splice merge` on synthetic Llamas of
0.1B, 0.37B and 0.95B parameters (bf16, three fine-tunes each; `merge_speed.py`'s models).

Run by hand on a quiet machine, from the repository root with the dev environment active:

    python benchmarks/merge_scaling.py                      # small,full,1b; ties,task_arithmetic
    python benchmarks/merge_scaling.py --sizes small --runs 2 --recipes task_arithmetic  # smoke
    python benchmarks/merge_scaling.py --memory 1GB --splice-args "--threads 2"

Disk: the models take 0.85 GB (small), 3.0 GB (full) and 7.6 GB (1b) under --work, plus one
output; --clean deletes each size's models after measuring it.

For each size: builds the models (cached), measures the I/O floor (read every input once and
write one output's bytes, page cache warm), then runs `splice merge` on each recipe --runs
times (fresh process; page cache warm; earlier writes flushed) and records the median wall
time, the peak RSS of the process tree, and the ratio to the I/O floor. The table shows
seconds per billion parameters (flat when time is linear in the parameter count) and the
peak RSS (flat when memory is set by --memory, not by the model). With --mergekit the same
recipes also run through mergekit-yaml (its --async-write configuration), interleaved.
Results: --work/scaling.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
from pathlib import Path

import merge_speed as ms


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path(".bench"), help="cache and output folder")
    ap.add_argument("--sizes", default="small,full,1b", help=f"comma list of {list(ms.SIZES)}")
    ap.add_argument("--recipes", default="ties,task_arithmetic", help=f"of {ms.RECIPES}")
    ap.add_argument("--dtypes", default="float32", help="compute dtypes (`dtype:`)")
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--memory", default="", help="splice merge --memory (default: its own)")
    ap.add_argument("--splice-args", default="", help="more flags for splice merge")
    ap.add_argument("--mergekit", action="store_true", help="also run mergekit-yaml")
    ap.add_argument("--clean", action="store_true", help="delete each size's models after it")
    args = ap.parse_args(argv)
    if args.runs < 2:
        ap.error("--runs must be at least 2 (the table reports medians)")
    if not Path(ms.TIME).is_file():
        ap.error(f"needs GNU time at {ms.TIME} for peak RSS (apt-get install time)")
    work = args.work.resolve()
    extra = args.splice_args.split() + (["--memory", args.memory] if args.memory else [])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    rows: list[dict[str, object]] = []
    for size in [s for s in args.sizes.split(",") if s]:
        shape = ms.SIZES[size]
        root = work / f"models-{size}"
        dirs = ms.build_models(root, shape)
        params = sum(math.prod(s) for _, s, _ in ms.llama_layout(shape))
        recipes = ms.recipes(work / size, dirs, args.recipes.split(","), args.dtypes.split(","))
        files = ms.input_files(dirs, list(ms.MODELS))
        in_bytes = sum(f.stat().st_size for f in files)
        floor = ms.io_floor(files, in_bytes // len(ms.MODELS), work / size / "scratch")
        outs = work / size / "out"
        outs.mkdir(parents=True, exist_ok=True)
        for recipe in recipes.values():
            tools = [("splice", " ".join(extra) or "default", extra)]
            if args.mergekit:
                tools.append(("mergekit", "async", ms.MERGEKIT_CONFIGS["async"]))
            for r in ms.bench_interleaved(tools, recipe, outs, files, args.runs, env):
                r.update(size=size, params=params, floor_s=floor["floor_s"])
                rows.append(r)
                shutil.rmtree(str(r["out"]), ignore_errors=True)
        if args.clean:
            shutil.rmtree(root, ignore_errors=True)
    print("\n== merge scaling (wall = whole process, median; RSS = peak of the process tree) ==")
    head = (
        f"{'size':6} {'params':>7} {'tool':9} {'recipe':24} {'median':>8} {'s/B params':>10} "
        f"{'vs floor':>8} {'peak RSS MB':>11}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        wall, params = float(r["wall_median_s"]), int(r["params"])  # type: ignore[arg-type]
        print(
            f"{r['size']:6} {params / 1e9:>6.3f}B {r['tool']:9} {r['recipe']:24} "
            f"{wall:>7.2f}s {wall / (params / 1e9):>10.1f} "
            f"{wall / float(r['floor_s']):>7.1f}x {r['peak_rss_mb']:>11.0f}"
        )  # type: ignore[arg-type]
    out = {
        "rows": rows,
        "splice": ms.splice_version(),
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
    }
    (work / "scaling.json").write_text(json.dumps(out, indent=2))
    print(f"\nresults: {work / 'scaling.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
