"""`splice bench`: train (or reuse) the experts, merge them every applicable way, evaluate.

Order of work, one progress bar over all of it:
1. check the config and pick the methods (errors before any heavy work);
2. load and split the tasks, write the pretrained backbone (once), tokenize the
   validation and test splits once;
3. the experts of each kind and the multi-task model (cache hits cost nothing);
4. baselines on test: each expert on its own task, the pretrained backbone with the
   experts' heads (λ = 0 of every task-vector method), the linear probe, the multi-task;
5. per kind and method: the sweep grid merged and scored on validation (the point equal
   to the default is also scored on test), the default on test, and the best grid point
   on test as the "tuned" row (ties go to the smaller value; the same as the default:
   the row is a copy, marked ``same_as_default``).

Selection uses the average validation accuracy over tasks; test data never informs a
choice. Outputs: results.json, results.md, accuracy_by_method.png,
accuracy_vs_coefficient.png under ``out``.
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

import splice
from splice.bench import report
from splice.bench.backbone import prepare_base
from splice.bench.config import BenchConfig
from splice.bench.evaluate import Evaluator, train_probe_heads
from splice.bench.experts import Expert, get_expert
from splice.bench.merging import merge_backbones
from splice.bench.methods import PlannedMethod, select_methods
from splice.bench.precision import resolve_precision
from splice.bench.tasks import TaskData, prepare_task
from splice.errors import SpliceError
from splice.io.out_location import prepare_work_folder
from splice.merge import get_method

WEAK_MARGIN = 0.1  # an expert this close to chance accuracy is flagged


def _mean(d: dict[str, float]) -> float:
    return sum(d.values()) / len(d)


def _applies(p: PlannedMethod, kind: str) -> bool:
    """Low-rank methods merge the LoRA experts' adapters: rows of the LoRA table only."""
    return kind == "lora" or not p.low_rank


def _units(planned: list[PlannedMethod], kinds: list[str], n_tasks: int, cfg: BenchConfig) -> int:
    merges = sum(
        (len(p.sweep[1]) + 2) if p.sweep else 1 for k in kinds for p in planned if _applies(p, k)
    )
    train = n_tasks * len(kinds) + int(cfg.baselines.multitask)
    return merges + train + 2 + len(kinds)  # + probe, multitask eval, per-kind baselines


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    return {
        "processor": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "splice": splice.__version__,
    }


class _Runner:
    def __init__(self, cfg: BenchConfig, progress: bool):
        self.cfg = cfg
        self.progress = progress
        self.rows: list[dict[str, Any]] = []
        self.sweeps: list[dict[str, Any]] = []
        self.failed: list[dict[str, str]] = []
        self.units = 0
        self.bar: Any = None

    def step(self, what: str) -> None:
        self.bar.set_description(what)

    def done(self, n: int = 1) -> None:
        self.units += n
        self.bar.update(n)

    # -- baselines ------------------------------------------------------------------------
    def baselines(
        self, ev: Evaluator, experts: dict[str, dict[str, Expert]], mt: Expert | None
    ) -> dict[str, dict[str, Any]]:
        base_state = ev.base.backbone_state()
        info: dict[str, dict[str, Any]] = {}
        for kind, pool in experts.items():
            self.step(f"{kind} experts: evaluate")
            info[kind] = {}
            test, val = {}, {}
            for name, e in pool.items():
                e_state = _load(e)
                test[name] = ev.evaluate(e_state, e.heads, "test", [name])[name]
                val[name] = ev.evaluate(e_state, e.heads, "validation", [name])[name]
                info[kind][name] = {
                    "test": test[name],
                    "validation": val[name],
                    "chance": 1 / ev.tasks[name].num_classes,
                    "margin_over_chance": test[name] - 1 / ev.tasks[name].num_classes,
                    "cached": e.cached,
                    "folder": str(e.folder),
                    **{k: e.meta.get(k) for k in ("steps", "train_seconds", "steps_per_second")},
                }
                if test[name] - 1 / ev.tasks[name].num_classes < WEAK_MARGIN:
                    tqdm.write(
                        f"splice bench: warning: the {kind} expert of {name} is within "
                        f"{WEAK_MARGIN:.0%} of chance ({test[name]:.1%}); its normalized "
                        "accuracies say little (more data, epochs or a higher lr?)"
                    )
            self.rows.append(_row(kind, "baseline", "experts", test, validation=val))
            heads = {name: e.heads[name] for name, e in pool.items()}
            zero = ev.evaluate(base_state, heads, "test")
            self.rows.append(_row(kind, "baseline", "pretrained + expert heads", zero))
            self.done()
        if self.cfg.baselines.probe:
            self.step("linear probe")
            probe = train_probe_heads(ev, base_state, seed=self.cfg.training.seed)
            self.rows.append(
                _row("shared", "baseline", "linear probe", ev.evaluate(base_state, probe, "test"))
            )
        self.done()
        if mt is not None:
            self.step("multi-task: evaluate")
            test = ev.evaluate(_load(mt), mt.heads, "test")
            self.rows.append(_row("shared", "baseline", "multi-task", test))
            info["multitask"] = {"test": test, "cached": mt.cached, **mt.meta}
        self.done()
        return info

    # -- merges ---------------------------------------------------------------------------
    def merge_method(
        self, kind: str, p: PlannedMethod, ev: Evaluator, base_folder: Path, pool: list[Expert]
    ) -> None:
        """Run one method (its sweep, default and tuned rows). A method that fails on this
        pool (a merge error, a numerical failure) is recorded in ``failed`` with its message
        and the run goes on; its rows are kept only if all of them succeeded."""
        expected = (len(p.sweep[1]) + 2) if p.sweep else 1
        before = self.units
        try:
            rows, sweep = self._merge_method(kind, p, ev, base_folder, pool)
        except (SpliceError, RuntimeError, ValueError) as e:
            msg = f"{type(e).__name__}: {e}"
            tqdm.write(f"splice bench: {kind} {p.name} failed, skipped: {msg}")
            self.failed.append({"kind": kind, "method": p.name, "error": msg})
            self.done(expected - (self.units - before))
            return
        self.rows.extend(rows)
        if sweep is not None:
            self.sweeps.append(sweep)

    def _merge_method(
        self, kind: str, p: PlannedMethod, ev: Evaluator, base_folder: Path, pool: list[Expert]
    ) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
        rows: list[dict[str, Any]] = []
        folders = [e.folder for e in pool]
        heads = {e.tasks[0]: e.heads[e.tasks[0]] for e in pool}
        seed = self.cfg.merge.seed

        def merge(params: dict[str, Any]) -> tuple[dict, float]:
            return merge_backbones(p.name, params, base_folder, folders, seed=seed)

        def test_row(state: dict, params: dict[str, Any], variant: str, secs: float, val=None):
            """The merged backbone's row: its test accuracy per task, and how it was made."""
            test = ev.evaluate(state, heads, "test")
            return _row(
                kind,
                "merged",
                p.name,
                test,
                params=params,
                variant=variant,
                merge_seconds=secs,
                validation=val,
            )

        if p.sweep is None:
            self.step(f"{kind} {p.name}")
            state, secs = merge(p.params)
            rows.append(test_row(state, p.params, "default", secs))
            self.done()
            return rows, None
        param, grid = p.sweep
        method = get_method(p.name)
        default_value = p.params.get(param, method.param(param).default)
        default_params = {**p.params, param: default_value}
        points, best, default_row = [], None, None
        for value in grid:
            self.step(f"{kind} {p.name} {param}={value}")
            state, secs = merge({**p.params, param: value})
            val = ev.evaluate(state, heads, "validation")
            points.append(
                {"value": value, "avg": _mean(val), "validation": val, "merge_seconds": secs}
            )
            if value == default_value:
                default_row = test_row(state, default_params, "default", secs, val)
            if best is None or _mean(val) > best[0]:
                best = (_mean(val), value, state, secs, val)
            self.done()
        self.step(f"{kind} {p.name} default")
        if default_row is None:
            state, secs = merge(default_params)
            default_row = test_row(state, default_params, "default", secs)
        rows.append(default_row)
        self.done()
        assert best is not None
        _, value, state, secs, val = best
        tuned_params = {**p.params, param: value}
        if value == default_value:
            tuned = {**default_row, "variant": "tuned", "same_as_default": True}
        else:
            self.step(f"{kind} {p.name} tuned")
            tuned = test_row(state, tuned_params, "tuned", secs, val)
        rows.append(tuned)
        self.done()
        edge = len(grid) > 1 and value in (grid[0], grid[-1])
        return rows, (
            {
                "at_grid_edge": edge,  # the optimum may lie outside the grid
                "kind": kind,
                "method": p.name,
                "param": param,
                "default": default_value,
                "best": value,
                "points": points,
            }
        )


def _load(e: Expert) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(e.folder / "model.safetensors"))


def _row(kind: str, group: str, method: str, test: dict[str, float], **extra: Any) -> dict:
    out = {"kind": kind, "group": group, "method": method, "test": test}
    out.update({k: v for k, v in extra.items() if v is not None})
    if "merge_seconds" in out:
        out["merge_seconds"] = round(out["merge_seconds"], 2)
    return out


def run_bench(cfg: BenchConfig, out: str | os.PathLike[str], progress: bool = True) -> dict:
    """Run the whole benchmark (see the module docstring); returns the results dict."""
    start = time.perf_counter()
    out = Path(out)
    n_models = len(cfg.tasks)
    planned, skipped = select_methods(
        cfg.merge.methods, n_models, cfg.merge.params, cfg.merge.grids, cfg.merge.sweep
    )
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    precision = resolve_precision(cfg.precision)
    prepare_work_folder(out)  # a clear error before any heavy work
    runner = _Runner(cfg, progress)
    total = _units(planned, cfg.kinds, n_models, cfg)
    with tqdm(
        total=total, desc="bench", unit="step", disable=not progress, dynamic_ncols=True
    ) as bar:
        runner.bar = bar
        runner.step("load data")
        tasks: list[TaskData] = [prepare_task(t, cfg.data) for t in cfg.tasks]
        base = prepare_base(cfg.model, cfg.training.seed)
        ev = Evaluator(
            base, tasks, cfg.training.max_length, cfg.eval_batch_size, precision=precision
        )
        t_prep = time.perf_counter() - start
        experts: dict[str, dict[str, Expert]] = {}
        for kind in cfg.kinds:
            experts[kind] = {}
            for task in tasks:
                runner.step(f"train {kind} {task.name}")
                experts[kind][task.name] = get_expert(base, [task], kind, cfg, progress)
                runner.done()
        mt = None
        if cfg.baselines.multitask:
            runner.step("train multi-task")
            mt = get_expert(base, tasks, "multitask", cfg, progress)
            runner.done()
        t_train = time.perf_counter() - start - t_prep
        info = runner.baselines(ev, experts, mt)
        for kind in cfg.kinds:
            pool = [experts[kind][t.name] for t in tasks]
            for p in planned:
                if _applies(p, kind):
                    runner.merge_method(kind, p, ev, base.folder, pool)
    names = [t.name for t in tasks]
    tables = {}
    for kind in cfg.kinds:
        own = {n: info[kind][n]["test"] for n in names}
        tables[kind] = report.section_rows(runner.rows, kind, own)
    total_s = time.perf_counter() - start
    results: dict[str, Any] = {
        "config": cfg.model_dump(mode="json"),
        "machine": machine(),
        "precision": precision,
        "tasks": {
            t.name: {
                "classes": t.num_classes,
                "sizes": t.sizes(),
                "label_names": list(t.label_names),
            }
            for t in tasks
        },
        "experts": info,
        "tables": tables,
        "sweeps": runner.sweeps,
        "methods": [
            {"name": p.name, "params": p.params, "sweep": p.sweep, "lora_experts_only": p.low_rank}
            for p in planned
        ],
        "skipped": [{"method": s.name, "reason": s.reason} for s in skipped],
        "failed": runner.failed,
        "timing": {
            "total_s": round(total_s, 1),
            "prepare_s": round(t_prep, 1),
            "train_s": round(t_train, 1),
            "baselines_merges_s": round(total_s - t_prep - t_train, 1),
        },
    }
    report.write_json(out / "results.json", results)
    (out / "results.md").write_text(report.render_tables(results))
    report.plot_methods(out / "accuracy_by_method.png", results)
    if runner.sweeps:
        report.plot_sweeps(out / "accuracy_vs_coefficient.png", results)
    return results
