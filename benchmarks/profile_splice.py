#!/usr/bin/env python
"""Where `splice merge` spends its time: a step-by-step breakdown of one merge, in process.

    python benchmarks/profile_splice.py .bench/full/recipes/ties.yaml [--threads 1]

Wraps splice's own functions (reading, the method's helper steps, writing, fsync) with
timers that add up per step, runs the merge through the engine (`plan_merge` +
`run_merge`), and prints seconds per step. With --threads 1 (the default) the steps run one
after another and add up to the wall time; "other" is what no wrapper covered (casts to
the compute and output dtypes, Python overhead). With more threads the step times are
summed over threads (busy time) and exceed the wall time.

Nested steps (e.g. `kth_largest` inside `_topk_flat` inside `magnitude_trim_`) are shown
indented; a parent's time includes its children's. Run benchmarks/merge_speed.py first:
it builds the models and writes the recipes.
"""

from __future__ import annotations

import argparse
import functools
import shutil
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import splice.engine.execute as execute
from splice.engine import plan_merge, run_merge
from splice.recipe.schema import load_recipe

# (module, attribute, label, depth): what to time. A class attribute is "Class.method".
STEPS: list[tuple[str, str, str, int]] = [
    ("splice.engine.execute", "_Runner.__call__", "job (all steps of one tensor)", 0),
    ("splice.engine.execute", "_Runner.read", "read input tensor (pread)", 1),
    ("splice.engine.execute", "_model_stat_rules", "whole-model statistics passes", 0),
    ("splice.merge.methods._common", "deltas_", "method: deltas θ_i − base", 1),
    ("splice.merge.methods._common", "magnitude_trim_", "method: magnitude trim (per model)", 1),
    ("splice.delta.topk", "magnitude", "|δ| in float32", 2),
    ("splice.delta.topk", "topk_mask", "top-k mask", 2),
    ("splice.delta.topk", "_topk_flat", "exact top-k (radix select + mask)", 3),
    ("splice.delta.topk", "kth_largest", "radix selection (2 bincounts)", 4),
    ("splice.delta.topk", "topk_mask_rows", "row-wise top-k (kthvalue)", 2),
    ("splice.delta.topk", "band_mask_rows", "band mask (breadcrumbs)", 2),
    ("splice.merge.methods._common", "ties_combine_", "method: sign election + disjoint mean", 1),
    ("splice.merge.methods._common", "linear_combine_", "method: weighted sum", 1),
    ("splice.io.writer", "ShardedWriter.write", "write output tensor (pwrite)", 1),
    ("splice.io.writer", "ShardedWriter._complete", "fsync + rename a finished shard", 2),
    ("splice.io.writer", "ShardedWriter.finalize", "finalize (index, config, fsync, rename)", 0),
]


class Timers:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.lock = threading.Lock()
        self.local = threading.local()

    def wrap(self, label: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            active = self.local.__dict__.setdefault("active", set())
            if label in active:  # recursion / re-entry: count the outer call only
                return fn(*args, **kwargs)
            active.add(label)
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                dt = time.perf_counter() - t0
                active.discard(label)
                with self.lock:
                    self.seconds[label] += dt
                    self.calls[label] += 1

        return timed


def install(timers: Timers) -> list[tuple[object, str, object]]:
    """Replace each step's function everywhere splice refers to it; returns undo records."""
    undo: list[tuple[object, str, object]] = []
    for module_name, attr, label, _ in STEPS:
        __import__(module_name)
        module = sys.modules[module_name]
        if "." in attr:
            cls_name, meth = attr.split(".")
            cls = getattr(module, cls_name, None)
            if cls is None or meth not in cls.__dict__:
                continue
            orig = cls.__dict__[meth]
            undo.append((cls, meth, orig))
            setattr(cls, meth, timers.wrap(label, orig))
            continue
        orig = getattr(module, attr, None)
        if orig is None:
            continue
        wrapped = timers.wrap(label, orig)
        for name, mod in list(sys.modules.items()):
            if (name == "splice" or name.startswith("splice.")) and getattr(
                mod, attr, None
            ) is orig:
                undo.append((mod, attr, orig))
                setattr(mod, attr, wrapped)
    return undo


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("recipe", type=Path)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path(".bench/profile-out"))
    args = ap.parse_args(argv)

    import splice.merge.methods  # noqa: F401  (register the methods before patching)

    timers = Timers()
    undo = install(timers)
    recipe, text = load_recipe(args.recipe)
    t0 = time.perf_counter()
    plan = plan_merge(recipe)
    t_plan = time.perf_counter() - t0
    try:
        t1 = time.perf_counter()
        report = run_merge(
            plan, args.out, threads=args.threads, overwrite=True, progress=False, recipe_text=text
        )
        wall = time.perf_counter() - t1
    finally:
        plan.close()
        for obj, attr, orig in reversed(undo):
            setattr(obj, attr, orig)
    shutil.rmtree(args.out, ignore_errors=True)

    print(
        f"recipe {args.recipe} ({recipe.method_name}), threads {args.threads}, "
        f"torch threads per job {max(1, (torch.get_num_threads()) // args.threads)}"
    )
    print(
        f"plan {t_plan:.2f} s; run_merge {wall:.2f} s; read {report.bytes_read / 1e9:.2f} GB, "
        f"wrote {report.bytes_written / 1e9:.2f} GB, {report.tensors} tensors"
    )
    print(f"\n{'step':58} {'seconds':>8} {'% wall':>7} {'calls':>6}")
    for _, _, label, depth in STEPS:
        if label not in timers.seconds:
            continue
        s = timers.seconds[label]
        print(f"{'  ' * depth + label:58} {s:>8.2f} {s / wall:>7.1%} {timers.calls[label]:>6}")
    top = sum(timers.seconds[lbl] for _, _, lbl, d in STEPS if d == 0)
    jobs = timers.seconds.get("job (all steps of one tensor)", 0.0)
    inside = sum(timers.seconds[lbl] for _, _, lbl, d in STEPS if d == 1)
    print(
        f"{'  job time not in a timed step (dtype casts, glue)':58} {jobs - inside:>8.2f} "
        f"{(jobs - inside) / wall:>7.1%}"
    )
    print(
        f"{'outside jobs (setup, thread hand-offs)':58} {wall - top:>8.2f} "
        f"{(wall - top) / wall:>7.1%}"
    )
    _ = execute  # keep the engine module imported for the class patches
    return 0


if __name__ == "__main__":
    sys.exit(main())
