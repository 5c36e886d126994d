#!/usr/bin/env python
"""Where `splice merge` spends its time: per phase and per step, in process.

    python benchmarks/profile_splice.py RECIPE [--threads 1]          # one recipe, all steps
    python benchmarks/profile_splice.py --models .bench/models-quick \
        [--methods ties,dare_ties,task_arithmetic,slerp,model_stock] \
        [--variants mergekit-f32,mergekit-bf16,native]                 # the phase table

Wraps splice's own functions with timers that add up per step, runs the merge through the
engine (`plan_merge` + `run_merge`) and prints seconds per step and per phase: read,
convert (inputs cast to the compute dtype), delta, selection (trim / drop), election (TIES
sign vote), combine (the rest of the method), cast (to the output dtype), write, plus
"stats" (whole-model statistic passes of the native TIES, and the per-tensor statistics of a
tensor merged in row chunks: its trim's keep rules or masks, Grams, row sums) and "other"
(what no timer covers: thread hand-offs, set-up). With --threads 1 (the default) the steps
run one after another and add up to the wall time; with more threads they are summed over
threads (busy time).

With --models, recipes for each method and variant are written next to the models (the
base and 3 fine-tunes of benchmarks/merge_speed.py, which builds them; TIES densities
0.2/0.3/0.5, weights 1/0.8/0.6, out_dtype bfloat16) and each runs in a fresh process:
"mergekit-f32" / "mergekit-bf16" are mergekit recipes with ``dtype: float32`` /
``bfloat16``; "native" is the same merge in splice's dialect (``method:``, its defaults).
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml

from splice.engine import plan_merge, run_merge
from splice.recipe.schema import load_recipe

# (module, attribute, label, depth, phase): what to time. A class attribute is
# "Class.method". ``phase`` files a top-level step under one of PHASES (None: a detail of
# its parent, shown indented).
STEPS: list[tuple[str, str, str, int, str | None]] = [
    ("splice.engine.execute", "_Runner.__call__", "job (all steps of one tensor)", 0, None),
    ("splice.engine.driver", "Sources.read", "read input tensor", 1, "read"),
    ("splice.engine.execute", "_model_stat_rules", "whole-model statistics passes", 0, "stats"),
    (
        "splice.engine.chunks",
        "chunk_tensor_rules",
        "per-tensor statistics of a chunked tensor",
        0,
        "stats",
    ),
    ("splice.engine.chunks", "chunk_keep_masks", "whole-tensor keep mask (torch order)", 1, None),
    ("splice.merge.registry", "MergeMethod.__call__", "method (all its steps)", 1, None),
    ("splice.merge.methods._common", "deltas_", "deltas θ_i − base", 2, "delta"),
    (
        "splice.merge.methods._common",
        "magnitude_trim_",
        "magnitude trim (per model)",
        2,
        "selection",
    ),
    ("splice.delta.topk", "magnitude", "|δ| in float32", 3, None),
    ("splice.delta.topk", "topk_mask", "top-k mask", 3, None),
    ("splice.delta.topk", "kth_largest", "radix selection (2 bincounts)", 4, None),
    ("splice.delta.argsort_select", "argsort_topk_mask", "torch-sort tie order", 4, None),
    ("splice.delta.argsort_select", "trim_like_argsort_", "compiled torch-order trim", 3, None),
    ("splice.merge.sparsify", "keep_rule_mask", "whole-model keep rule mask", 3, None),
    ("splice.merge.methods.dare", "dare_drop_", "DARE drop + rescale", 2, "selection"),
    ("splice.merge.methods.dare", "dare_mask", "DARE Bernoulli keep mask (torch)", 3, None),
    ("splice.merge.methods.dare", "dare_apply_", "DARE mask product + rescale", 3, None),
    ("splice.merge.methods._common", "elect_signs", "sign election", 2, "election"),
    (
        "splice.merge.methods._mergekit_precision",
        "gta_agreement",
        "sign election (dtype)",
        2,
        "election",
    ),
    ("splice.io.writer", "ShardedWriter.write", "write output tensor (pwrite)", 1, "write"),
    ("splice.io.writer", "ShardedWriter._complete", "fsync + rename a finished shard", 2, None),
    ("splice.io.writer", "ShardedWriter.finalize", "finalize (index, config, fsync)", 0, "write"),
]
# The per-tensor phases of a merge, in order. "convert": inputs cast to the compute dtype;
# "combine": the method's time outside its delta, selection and election steps; "cast": the
# result cast to the output dtype; "other": what none covers (thread hand-offs, set-up).
PHASES = ("read", "convert", "delta", "selection", "election", "combine", "cast", "write")


class Timers:
    """Seconds and calls per step label, summed over threads; a step re-entered inside
    itself counts once. Also times ``Tensor.to`` inside a job but outside the method:
    before it as "convert", after it as "cast"."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.cpu: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.lock = threading.Lock()
        self.local = threading.local()

    def add(self, label: str, dt: float, cpu: float) -> None:
        with self.lock:
            self.seconds[label] += dt
            self.cpu[label] += cpu
            self.calls[label] += 1

    def wrap(self, label: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            active = self.local.__dict__.setdefault("active", set())
            if label in active:  # recursion / re-entry: count the outer call only
                return fn(*args, **kwargs)
            active.add(label)
            self._enter(label)
            t0, c0 = time.perf_counter(), time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.add(label, time.perf_counter() - t0, time.process_time() - c0)
                active.discard(label)
                self._leave(label)

        return timed

    def _enter(self, label: str) -> None:
        if label == STEPS[0][2]:
            self.local.job = "convert"
        elif label == "method (all its steps)":
            self.local.job = None

    def _leave(self, label: str) -> None:
        if label == STEPS[0][2]:
            self.local.job = None
        elif label == "method (all its steps)":
            self.local.job = "cast"

    def wrap_to(self, to: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(to)
        def timed_to(*args: Any, **kwargs: Any) -> Any:
            phase = getattr(self.local, "job", None)
            if phase is None:
                return to(*args, **kwargs)
            t0, c0 = time.perf_counter(), time.process_time()
            try:
                return to(*args, **kwargs)
            finally:
                self.add(phase, time.perf_counter() - t0, time.process_time() - c0)

        return timed_to


def install(timers: Timers) -> list[tuple[object, str, object]]:
    """Replace each step's function everywhere splice refers to it; returns undo records."""
    undo: list[tuple[object, str, object]] = [(torch.Tensor, "to", torch.Tensor.to)]
    torch.Tensor.to = timers.wrap_to(torch.Tensor.to)  # type: ignore[method-assign]
    for module_name, attr, label, _, _ in STEPS:
        __import__(module_name)
        module = sys.modules[module_name]
        if "." in attr:
            cls_name, meth = attr.split(".")
            cls = getattr(module, cls_name, None)
            if cls is None or meth not in cls.__dict__:
                print(f"note: {module_name}.{attr} not found, not timed", file=sys.stderr)
                continue
            orig = cls.__dict__[meth]
            undo.append((cls, meth, orig))
            setattr(cls, meth, timers.wrap(label, orig))
            continue
        orig = getattr(module, attr, None)
        if orig is None:
            print(f"note: {module_name}.{attr} not found, not timed", file=sys.stderr)
            continue
        wrapped = timers.wrap(label, orig)
        for name, mod in list(sys.modules.items()):
            if (name == "splice" or name.startswith("splice.")) and getattr(
                mod, attr, None
            ) is orig:
                undo.append((mod, attr, orig))
                setattr(mod, attr, wrapped)
    return undo


def phases(sec: dict[str, float], wall: float) -> dict[str, float]:
    """Seconds per phase (PHASES + stats + other) from the step timers ``sec`` (wall or
    CPU seconds per label) and the run's total ``wall`` (or CPU) seconds."""
    out = {p: 0.0 for p in (*PHASES, "stats")}
    for _, _, label, _, phase in STEPS:
        if phase is not None:
            out[phase] += sec.get(label, 0.0)
    out["convert"] += sec.get("convert", 0.0)
    out["cast"] += sec.get("cast", 0.0)
    inside = out["delta"] + out["selection"] + out["election"]
    out["combine"] = sec.get("method (all its steps)", 0.0) - inside
    out["other"] = wall - sum(out.values())
    return out


def profile(recipe_path: Path, threads: int, out: Path, torch_threads: int = 1) -> dict[str, Any]:
    import splice.merge.methods  # noqa: F401  (register the methods before patching)

    timers = Timers()
    undo = install(timers)
    # One torch intra-op thread, kept (run_merge would set its own): CPU seconds are then the
    # work done, not OpenMP workers spin-waiting, which on a loaded machine counts as CPU.
    set_threads = torch.set_num_threads
    set_threads(torch_threads)
    torch.set_num_threads = lambda n: None  # type: ignore[assignment]
    undo.append((torch, "set_num_threads", set_threads))
    recipe, text = load_recipe(recipe_path)
    t0 = time.perf_counter()
    plan = plan_merge(recipe)
    t_plan = time.perf_counter() - t0
    try:
        t1, c1 = time.perf_counter(), time.process_time()
        report = run_merge(
            plan, out, threads=threads, overwrite=True, progress=False, recipe_text=text
        )
        wall, cpu = time.perf_counter() - t1, time.process_time() - c1
    finally:
        plan.close()
        for obj, attr, orig in reversed(undo):
            setattr(obj, attr, orig)
    shutil.rmtree(out, ignore_errors=True)
    return {
        "recipe": str(recipe_path),
        "method": recipe.method_name,
        "threads": threads,
        "plan_s": t_plan,
        "wall_s": wall,
        "cpu_s": cpu,
        "read_gb": report.bytes_read / 1e9,
        "written_gb": report.bytes_written / 1e9,
        "tensors": report.tensors,
        "steps": {k: [v, timers.cpu[k], timers.calls[k]] for k, v in timers.seconds.items()},
        "phases": phases(timers.seconds, wall),
        "cpu_phases": phases(timers.cpu, cpu),
    }


def print_steps(res: dict[str, Any]) -> None:
    wall, cpu = res["wall_s"], res["cpu_s"]
    print(f"recipe {res['recipe']} ({res['method']}), threads {res['threads']}")
    print(
        f"plan {res['plan_s']:.2f} s; run_merge {wall:.2f} s wall, {cpu:.2f} s CPU; read "
        f"{res['read_gb']:.2f} GB, wrote {res['written_gb']:.2f} GB, {res['tensors']} tensors"
    )
    print(f"\n{'step':58} {'wall s':>8} {'CPU s':>8} {'% CPU':>7} {'calls':>6}")
    for _, _, label, depth, _ in STEPS:
        if label in res["steps"]:
            s, c, calls = res["steps"][label]
            print(f"{'  ' * depth + label:58} {s:>8.2f} {c:>8.2f} {c / cpu:>7.1%} {calls:>6}")
    print(f"\n{'phase':58} {'wall s':>8} {'CPU s':>8} {'% CPU':>7}")
    for name, s in res["phases"].items():
        c = res["cpu_phases"][name]
        print(f"{name:58} {s:>8.2f} {c:>8.2f} {c / cpu:>7.1%}")


# -- the phase table over methods and variants ------------------------------------------

WEIGHTS, DENSITIES = [1.0, 0.8, 0.6], [0.2, 0.3, 0.5]
VARIANTS = {
    "mergekit-f32": ("merge_method", {"dtype": "float32", "out_dtype": "bfloat16"}),
    "mergekit-bf16": ("merge_method", {"dtype": "bfloat16", "out_dtype": "bfloat16"}),
    "native": ("method", {"out_dtype": "bfloat16"}),
}


def recipe_doc(models: Path, method: str, variant: str) -> dict[str, Any]:
    key, extra = VARIANTS[variant]
    base = str((models / "base").resolve())
    fts = [str((models / f"ft{i}").resolve()) for i in range(3)]
    doc: dict[str, Any] = {key: method, "base_model": base}
    if method in ("ties", "dare_ties"):
        doc["models"] = [
            {"model": m, "parameters": {"weight": w, "density": d}}
            for m, w, d in zip(fts, WEIGHTS, DENSITIES, strict=True)
        ]
        if method == "ties":
            doc["parameters"] = {"normalize": True}
    elif method == "task_arithmetic":
        doc["models"] = [
            {"model": m, "parameters": {"weight": w}} for m, w in zip(fts, WEIGHTS, strict=True)
        ]
    elif method == "slerp":
        doc["models"] = [{"model": fts[0]}]
        doc["parameters"] = {"t": 0.4}
    elif method == "model_stock":
        doc["models"] = [{"model": m} for m in fts]
    else:
        raise SystemExit(f"no recipe for method '{method}'")
    return {**doc, **extra}


def phase_table(args: argparse.Namespace) -> int:
    models = args.models.resolve()
    if not (models / "base").is_dir():
        raise SystemExit(f"{models}/base not found: build the models with merge_speed.py first")
    rdir = models.parent / "profile-recipes"
    rdir.mkdir(exist_ok=True)
    rows = []
    for method in args.methods.split(","):
        for variant in args.variants.split(","):
            path = rdir / f"{method}-{variant}.yaml"
            path.write_text(yaml.safe_dump(recipe_doc(models, method, variant), sort_keys=False))
            cmd = [sys.executable, __file__, str(path), "--threads", str(args.threads), "--json"]
            cmd += ["--torch-threads", str(args.torch_threads)]
            cmd += ["--out", str(args.out)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"{method} {variant} failed:\n{proc.stderr[-3000:]}")
            res = json.loads(proc.stdout.strip().splitlines()[-1])
            res["variant"] = variant
            rows.append(res)
            print_row(res, header=len(rows) == 1)
    if args.save:
        args.save.write_text(json.dumps(rows, indent=2))
    return 0


def print_row(res: dict[str, Any], header: bool) -> None:
    """One line of the phase table: CPU seconds per phase (wall time is shown too, but on
    a shared machine only the CPU seconds compare between runs)."""
    cols = (*PHASES, "stats", "other")
    if header:
        print(
            f"{'method':16} {'variant':14} {'wall':>6} {'CPU':>6} "
            + " ".join(f"{c[:9]:>9}" for c in cols)
        )
    ph = res["cpu_phases"]
    print(
        f"{res['method']:16} {res['variant']:14} {res['wall_s']:>6.2f} {res['cpu_s']:>6.2f} "
        + " ".join(f"{ph[c]:>9.2f}" for c in cols),
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("recipe", type=Path, nargs="?")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path(".bench/profile-out"))
    ap.add_argument("--torch-threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--json", action="store_true", help="print one JSON line (for --models)")
    ap.add_argument("--models", type=Path, help="folder with base, ft0, ft1, ft2")
    ap.add_argument("--methods", default="ties,dare_ties,task_arithmetic,slerp,model_stock")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--save", type=Path, help="write the phase table's rows as JSON here")
    args = ap.parse_args(argv)
    if args.models is not None:
        return phase_table(args)
    if args.recipe is None:
        ap.error("give a recipe or --models")
    res = profile(args.recipe, args.threads, args.out, args.torch_threads)
    if args.json:
        print(json.dumps(res))
    else:
        print_steps(res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
