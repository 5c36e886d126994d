"""`splice bench --ray [ADDRESS]`: the bench's units of work as Ray tasks (docs/ray.md).

Units: **train** one expert (kind, task) or the multi-task model; **merge + evaluate** one
(kind, method, setting): a sweep's grid point (merged, scored on validation and test), the
default setting when the grid does not hold it, a method without a sweep. Everything else
(data, the pretrained backbone, the baselines, AdaMerging, the composition rows, the
tables) runs on the driver as in a local run, and a coefficient search sends each CMA-ES
generation's candidates out as parallel tasks (`splice.engine.ray_pool`).

Workers read their inputs from the bench cache (`splice.bench.cache`): the driver writes
the pretrained backbone, a training unit writes its expert folder there atomically (the
same `cache_folder` as a local run, the same key), a merge unit reads the experts back.
So a rerun, under Ray or not, trains nothing that either mode finished. The driver passes
its cache path to every unit: on a cluster that path must be a shared file system mounted
at the same place on every node (as must the model and the task files).

Same results as a local run: each unit runs the very functions the local run does
(`get_expert`, `merge_backbones`, `Evaluator.evaluate`) on the same seeded inputs, and the
driver assembles the rows in the local run's order with its rules (the best grid point by
mean validation accuracy, ties to the earlier value; a default on the grid is that point).
One difference in work, not in results: a grid point's unit also scores test, since which
point will be chosen is not known when it runs (a local run keeps the best state instead);
test scores of points not chosen are dropped, so test data still informs no choice.
Merge units return their scores to the driver (a few numbers); only experts are cached.

A worker builds the run's tasks, base and evaluator once (remembered per run in the worker
process) and runs with ``threads`` (the config's, else 1) CPUs reserved and torch threads.

A causal-LM pool's runner (`bench.lm_ray_run`) uses the same pieces: `run_spec`,
`run_context` (with its own context builder), `merge_units`, `submit_units`, `gather_units`.
"""

from __future__ import annotations

import dataclasses
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from splice.bench.backbone import Base, prepare_base
from splice.bench.cache import content_key
from splice.bench.config import BenchConfig, parse_bench_config
from splice.bench.evaluate import Evaluator
from splice.bench.experts import Expert, expert_folder, get_expert
from splice.bench.merging import merge_backbones
from splice.bench.methods import PlannedMethod, best_point
from splice.bench.precision import resolve_precision
from splice.bench.results import Failure, Row, Sweep, SweepPoint
from splice.bench.run import _mean, _method_units, _Runner
from splice.bench.tasks import TaskData, prepare_task
from splice.engine.ray_pool import RayPool, candidate_evaluator
from splice.errors import SpliceError
from splice.train.models import cache_root

Spec = dict[str, Any]  # what a unit needs to rebuild the run in a worker (JSON-like)


class RayRunner(_Runner):
    """`_Runner` with the training and merge units sent to Ray."""

    def __init__(self, cfg: BenchConfig, progress: bool):
        super().__init__(cfg, progress)
        self.pool = RayPool(cfg.threads or 1)
        self.spec = run_spec(cfg)

    # -- experts --------------------------------------------------------------------------
    def train_experts(
        self, base: Base, tasks: list[TaskData]
    ) -> tuple[dict[str, dict[str, Expert]], Expert | None]:
        """The cache misses trained as parallel units; then every model read from the cache
        (those trained now are marked ``cached = False``, as a local run marks them)."""
        jobs = [(kind, [t]) for kind in self.cfg.kinds for t in tasks]
        if self.cfg.baselines.multitask:
            jobs.append(("multitask", tasks))
        missing = [
            (kind, ts)
            for kind, ts in jobs
            if not (expert_folder(base, ts, kind, self.cfg) / "meta.json").is_file()
        ]
        self.done(len(jobs) - len(missing))
        self.step(f"train {len(missing)} model(s) on Ray")
        units = [(self.spec, kind, [t.name for t in ts]) for kind, ts in missing]
        self.pool.map(train_unit, units, on_done=lambda _: self.done())
        trained = {(kind, tuple(t.name for t in ts)) for kind, ts in missing}

        def load(kind: str, ts: list[TaskData]) -> Expert:
            e = get_expert(base, ts, kind, self.cfg, progress=False)  # a cache hit now
            e.cached = (kind, tuple(t.name for t in ts)) not in trained
            return e

        experts = {kind: {t.name: load(kind, [t]) for t in tasks} for kind in self.cfg.kinds}
        mt = load("multitask", tasks) if self.cfg.baselines.multitask else None
        return experts, mt

    # -- merges ---------------------------------------------------------------------------
    def merge_all(
        self,
        planned: list[PlannedMethod],
        ev: Evaluator,
        base_folder: Path,
        experts: dict[str, dict[str, Expert]],
    ) -> None:
        """Every merge unit submitted at once; then, method by method in the local order,
        its rows assembled (AdaMerging and the statistics-based methods run here on the driver
        meanwhile)."""
        jobs = []
        for kind in self.cfg.kinds:
            for p in planned:
                if not p.applies_to(kind):
                    continue
                if p.data_aware or p.statistics is not None:  # on the driver
                    jobs.append((kind, p, [], []))
                else:
                    jobs.append((kind, p, *submit_units(self.pool, merge_unit, self.spec, kind, p)))
        for kind, p, units, refs in jobs:
            if p.data_aware or p.statistics is not None:
                pool = [experts[kind][t] for t in ev.tasks]
                self.merge_method(kind, p, ev, base_folder, pool)
                continue
            self.step(f"{kind} {p.name}")
            results, error = gather_units(self.pool, refs, on_done=lambda _: self.done())
            self.done(_method_units(p) - len(units))
            if error is not None:
                tqdm.write(f"splice bench: {kind} {p.name} failed, skipped: {error}")
                self.failed.append(Failure(kind, p.name, error))
                continue
            rows, sweep = assemble(kind, p, units, results)
            self.rows.extend(rows)
            if sweep is not None:
                self.sweeps.append(sweep)

    # -- searches -------------------------------------------------------------------------
    def search_evaluator(self, kind: str, method: str, objective: str) -> Any:
        factory = partial(search_objective, self.spec, kind, objective)
        return candidate_evaluator(self.pool, factory, f"{self.spec['key']}/{kind}/{method}")


# -- units: what a method needs merged, and the rows made of their results -----------------
Unit = tuple[Any, dict[str, Any], tuple[str, ...]]  # (grid value | None, params, splits)


def merge_units(p: PlannedMethod) -> list[Unit]:
    """A method's merges: each grid point (validation and test), then the default when the
    grid lacks it (test); a method without a sweep: its default (test)."""
    if p.sweep is None:
        return [(None, p.params, ("test",))]
    param, default_value, default_params = p.default_setting()
    units: list[Unit] = [(v, {**p.params, param: v}, ("validation", "test")) for v in p.sweep[1]]
    if default_value not in p.sweep[1]:
        units.append((None, default_params, ("test",)))
    return units


def submit_units(
    pool: RayPool, fn: Callable[..., dict[str, Any]], spec: Spec, kind: str, p: PlannedMethod
) -> tuple[list[Unit], list[Any]]:
    """Start ``fn(spec, kind, method, params, splits)`` for each of ``p``'s merge units (the
    classifier's `merge_unit`, the causal-LM pool's); the units and their references."""
    units = merge_units(p)
    refs = [pool.submit(fn, spec, kind, p.name, params, splits) for _, params, splits in units]
    return units, refs


def gather_units(
    pool: RayPool, refs: list[Any], on_done: Callable[[int], None] | None = None
) -> tuple[list[dict[str, Any]], str | None]:
    """The units' results in order, and the first one's error in unit order (the merge a
    local run would have failed on first), or None."""
    results = pool.gather(refs, on_done=on_done)
    return results, next((r["error"] for r in results if "error" in r), None)


def assemble(
    kind: str, p: PlannedMethod, units: list[Unit], results: list[dict[str, Any]]
) -> tuple[list[Row], Sweep | None]:
    """The rows (and sweep) a local run makes from the same merges (`_Runner._merge_method`)."""

    def row(r: dict[str, Any], params: dict[str, Any], variant: str, val=None) -> Row:
        secs = round(r["seconds"], 2)
        return Row(kind, "merged", p.name, r["test"], params, variant, secs, val)

    if p.sweep is None:
        return [row(results[0], p.params, "default")], None
    param, default_value, default_params = p.default_setting()
    points, on_grid, default_row = [], [], None
    for (value, _, splits), r in zip(units, results):
        if "validation" not in splits:  # the default, off the grid
            default_row = row(r, default_params, "default")
            continue
        val = r["validation"]
        points.append(SweepPoint(value, _mean(val), val, r["seconds"]))
        on_grid.append(r)
        if value == default_value:
            default_row = row(r, default_params, "default", val)
    best = best_point([q.avg for q in points])
    assert best is not None and default_row is not None
    value, r = points[best].value, on_grid[best]
    if value == default_value:
        tuned = dataclasses.replace(default_row, variant="tuned", same_as_default=True)
    else:
        tuned = row(r, {**p.params, param: value}, "tuned", r["validation"])
    return [default_row, tuned], Sweep(kind, p.name, param, default_value, value, points)


# -- in the worker --------------------------------------------------------------------------
@dataclass
class _Context:
    """One run's data, base, evaluator and experts, built once per worker process."""

    cfg: BenchConfig
    tasks: list[TaskData]
    base: Base
    evaluator: Evaluator | None = None
    pools: dict[str, list[Expert]] = field(default_factory=dict)

    def ev(self) -> Evaluator:
        if self.evaluator is None:
            cfg = self.cfg
            self.evaluator = Evaluator(
                self.base,
                self.tasks,
                cfg.training.max_length,
                cfg.eval_batch_size,
                precision=resolve_precision(cfg.precision),
            )
        return self.evaluator

    def pool(self, kind: str) -> list[Expert]:
        """The experts of ``kind`` in task order (read from the cache)."""
        if kind not in self.pools:
            self.pools[kind] = [
                get_expert(self.base, [t], kind, self.cfg, progress=False) for t in self.tasks
            ]
        return self.pools[kind]

    @classmethod
    def build(cls, cfg: BenchConfig) -> _Context:
        tasks = [prepare_task(t, cfg.data) for t in cfg.tasks]
        return cls(cfg, tasks, prepare_base(cfg.model, cfg.training.seed))


def run_spec(cfg: BenchConfig) -> Spec:
    """What a unit needs to rebuild the run in a worker: the config, the driver's cache path
    and a key unique to this run."""
    config = cfg.model_dump(mode="json")
    cache = str(cache_root().resolve())
    spec: Spec = {"config": config, "cache": cache, "run": uuid.uuid4().hex}
    spec["key"] = content_key(spec)  # this run, in the workers
    return spec


_CONTEXTS: dict[str, Any] = {}  # the current run of this worker process


def run_context(spec: Spec, build: Callable[[BenchConfig], Any] = _Context.build) -> Any:
    """In the worker: the run's context, ``build(config)`` once per run and worker process
    (a new run drops the previous one's), with the driver's bench cache."""
    os.environ["SPLICE_CACHE"] = spec["cache"]  # the driver's cache (shared on a cluster)
    if spec["key"] not in _CONTEXTS:
        _CONTEXTS.clear()
        _CONTEXTS[spec["key"]] = build(parse_bench_config(spec["config"]))
    return _CONTEXTS[spec["key"]]


def train_unit(spec: Spec, kind: str, names: list[str]) -> None:
    """Train the model of ``kind`` on the tasks ``names`` into the cache (a hit: nothing)."""
    ctx = run_context(spec)
    get_expert(ctx.base, [t for t in ctx.tasks if t.name in names], kind, ctx.cfg, False)


def merge_unit(
    spec: Spec, kind: str, method: str, params: dict[str, Any], splits: tuple[str, ...]
) -> dict[str, Any]:
    """Merge the experts of ``kind`` with ``method``; its accuracy per task on ``splits``
    and the merge's seconds, or ``{"error": ...}`` for a failure a local run records."""
    ctx = run_context(spec)
    pool = ctx.pool(kind)
    heads = {e.tasks[0]: e.heads[e.tasks[0]] for e in pool}
    try:
        state, secs = merge_backbones(
            method, params, ctx.base.folder, [e.folder for e in pool], seed=ctx.cfg.merge.seed
        )
        return {"seconds": secs, **{s: ctx.ev().evaluate(state, heads, s) for s in splits}}
    except (SpliceError, RuntimeError, ValueError) as e:
        return {"error": f"{type(e).__name__}: {e}"}


def search_objective(spec: Spec, kind: str, objective: str) -> Any:
    """The coefficient-search objective of ``kind``'s experts, built in the worker."""
    from splice.bench.search import objective_value

    ctx = run_context(spec)
    heads = {e.tasks[0]: e.heads[e.tasks[0]] for e in ctx.pool(kind)}
    ev = ctx.ev()
    return lambda state: objective_value(ev, state, heads, objective)[0]
