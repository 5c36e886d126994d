"""`splice bench --ray` on a causal-LM pool: the LM runner's units as Ray tasks (docs/ray.md).

The classifier bench's machinery (`bench.ray_run`: the run's spec and worker context, the
merge units of a method, their submission and gathering; `engine.ray_pool.RayPool`)
applied to `bench.lm_run`'s steps:

- **train** one expert (kind, task) or the multi-task model (``baselines.multitask``):
  `lm_experts.get_lm_expert` / `get_lm_multitask` in a worker, written into the bench
  cache under the key a local run uses (cache hits are not sent);
- **merge + evaluate** one (kind, method, setting) (`ray_run.merge_units`): the merge of the
  experts' HF folders (`merging.merge_backbones`, the merge seed of the config) scored by
  an `LMEvaluator` on validation and test for a grid point, on test for the default off
  the grid and for a method without a sweep. A unit returns the raw metrics per task.

The driver (`lm_run.run_lm_bench`) keeps everything else: the tasks, the pretrained,
expert and multi-task baselines (evaluated while the merge units run), the normalization,
the tables.
The data-aware rows (fisher, regmean, fisher_graft, regmean++, fw_merging;
`bench.lm_stat_merging`) run on the driver as a local run makes them (statistics and
merges in process). It assembles each other method's rows from its units' metrics with
the local rules (`lm_assemble`): the default row, and the tuned row at the grid point of
the best mean normalized validation score (`methods.best_point`: ties to the earlier value, points
without a score skipped; no tuned row when none has one). Test scores of points not
chosen are dropped, so test data informs no choice. A failing merge (`SpliceError`,
`RuntimeError`, `ValueError`) is recorded under ``failed`` as locally: the first failing
unit in the local order.

A worker builds the run's tasks, resolves the model and loads one evaluator once per run
(`ray_run.run_context`); it runs with ``threads`` CPUs and torch threads (config, else 1).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from splice.bench.config import BenchConfig
from splice.bench.lm_evaluate import LMEvaluator
from splice.bench.lm_experts import (
    MULTITASK,
    get_lm_expert,
    get_lm_multitask,
    lm_expert_key,
    lm_multitask_key,
)
from splice.bench.lm_run import (
    LMRow,
    LMRunner,
    Scores,
    mean_defined,
    score,
)
from splice.bench.lm_tasks import LMTaskData, prepare_lm_task
from splice.bench.methods import PlannedMethod, best_point
from splice.bench.ray_run import Spec, Unit, gather_units, run_context, run_spec, submit_units
from splice.engine.ray_pool import RayPool
from splice.errors import SpliceError


class LMRayRunner(LMRunner):
    """`LMRunner` with the training and merge units sent to Ray."""

    def __init__(self, cfg: BenchConfig, ev: LMEvaluator, folder: Path, log: Any, progress: bool):
        super().__init__(cfg, ev, folder, log, progress)
        self.pool = RayPool(cfg.threads or 1)
        self.spec: Spec = run_spec(cfg)
        self.jobs: dict[tuple[str, str], tuple[list[Unit], list[Any]]] = {}

    def train_experts(self, identity: dict[str, Any], tasks: list[LMTaskData]) -> None:
        """The cache misses (experts, the multi-task model) trained as parallel units; then
        every model read from the cache (those trained now marked ``cached = False``, as a
        local run marks them)."""
        cfg = self.cfg
        missing = [
            (kind, t.name)
            for kind in cfg.kinds
            for t in tasks
            if not (lm_expert_key(identity, t, kind, cfg)[1] / "meta.json").is_file()
        ]
        mt_folder = lm_multitask_key(identity, tasks, cfg)[1]
        if cfg.baselines.multitask and not (mt_folder / "meta.json").is_file():
            missing.append((MULTITASK, ""))
        self.log(f"train {len(missing)} model(s) on Ray")
        self.pool.map(lm_train_unit, [(self.spec, kind, name) for kind, name in missing])
        trained = set(missing)
        for kind in cfg.kinds:
            self.experts[kind] = {}
            for t in tasks:
                e = get_lm_expert(self.folder, identity, t, kind, cfg, False)  # a cache hit
                e.cached = (kind, t.name) not in trained
                self.experts[kind][t.name] = e
        if cfg.baselines.multitask:
            self.multitask = get_lm_multitask(self.folder, identity, tasks, cfg, False)
            self.multitask.cached = (MULTITASK, "") not in trained

    def start_merges(self, planned: list[PlannedMethod]) -> None:
        """Every merge unit of every (kind, method) submitted at once."""
        for kind in self.cfg.kinds:
            for p in planned:
                if p.applies_to(kind) and p.statistics is None:  # statistic rows: the driver
                    self.jobs[(kind, p.name)] = submit_units(
                        self.pool, lm_merge_unit, self.spec, kind, p
                    )

    def method_rows(
        self, p: PlannedMethod, kind: str, row: Any, ex_val: Scores, pre_val: Scores
    ) -> list[LMRow] | str:
        if p.statistics is not None:  # collected and merged here (bench.lm_stat_merging)
            return super().method_rows(p, kind, row, ex_val, pre_val)
        units, refs = self.jobs.pop((kind, p.name))
        results, error = gather_units(self.pool, refs)
        return error if error is not None else lm_assemble(p, units, results, row, ex_val, pre_val)


def lm_assemble(
    p: PlannedMethod,
    units: list[Unit],
    results: list[dict[str, Any]],
    row: Any,
    ex_val: Scores,
    pre_val: Scores,
) -> list[LMRow]:
    """The rows a local run makes from the same merges (`lm_run._method_rows`). ``row``:
    the kind's row maker (`lm_run.make_row` with its experts' and the pretrained test
    scores); ``ex_val`` / ``pre_val``: the experts' and the pretrained validation scores."""

    def make(r: dict[str, Any], params: dict[str, Any], variant: str, val=None) -> LMRow:
        secs = round(r["seconds"], 2)
        return row(
            "merged",
            p.name,
            r["test"],
            params=params,
            variant=variant,
            merge_seconds=secs,
            validation_score=val,
        )

    if p.sweep is None:
        return [make(results[0], p.params, "default")]
    _, default_value, _ = p.default_setting()
    scores: list[float | None] = []
    on_grid: list[tuple[dict[str, Any], dict[str, Any]]] = []
    default = None
    for (value, params, splits), r in zip(units, results, strict=True):
        if "validation" not in splits:  # the default, off the grid
            default = make(r, params, "default")
            continue
        val = mean_defined(score(r["validation"], ex_val, pre_val))
        scores.append(val)
        on_grid.append((params, r))
        if value == default_value:
            default = make(r, params, "default", val)
    assert default is not None
    best = best_point(scores)
    if best is None:
        return [default]
    params, r = on_grid[best]
    return [default, make(r, params, "tuned", scores[best])]


# -- in the worker --------------------------------------------------------------------------
@dataclass
class _LMContext:
    """One run's tasks, model folder, evaluator and expert folders, built once per worker."""

    cfg: BenchConfig
    tasks: list[LMTaskData]
    folder: Path
    identity: dict[str, Any]
    evaluator: LMEvaluator | None = None
    folders: dict[str, list[Path]] = field(default_factory=dict)

    @classmethod
    def build(cls, cfg: BenchConfig) -> _LMContext:
        from splice.bench.cache import model_identity
        from splice.train.models import resolve_model

        tasks = [prepare_lm_task(t, cfg.data) for t in cfg.tasks]
        folder = resolve_model(cfg.model)
        return cls(cfg, tasks, folder, model_identity(folder))

    def ev(self) -> LMEvaluator:
        if self.evaluator is None:
            from splice.train.models import load_for_task

            cfg = self.cfg
            model, tok, _ = load_for_task(str(self.folder), "causal_lm")
            length, batch, new = cfg.training.max_length, cfg.eval_batch_size, cfg.lm.max_new_tokens
            self.evaluator = LMEvaluator(model, tok, self.tasks, length, batch, new)
        return self.evaluator

    def expert_folders(self, kind: str) -> list[Path]:
        """The experts of ``kind`` in task order (read from the cache)."""
        if kind not in self.folders:
            self.folders[kind] = [
                get_lm_expert(self.folder, self.identity, t, kind, self.cfg, False).folder
                for t in self.tasks
            ]
        return self.folders[kind]


def lm_train_unit(spec: Spec, kind: str, name: str) -> None:
    """Train the ``kind`` expert of task ``name`` into the cache (a hit: nothing); kind
    ``multitask``: the multi-task model on every task (``name`` unused)."""
    ctx: _LMContext = run_context(spec, _LMContext.build)
    if kind == MULTITASK:
        get_lm_multitask(ctx.folder, ctx.identity, ctx.tasks, ctx.cfg, False)
        return
    task = next(t for t in ctx.tasks if t.name == name)
    get_lm_expert(ctx.folder, ctx.identity, task, kind, ctx.cfg, False)


def lm_merge_unit(
    spec: Spec, kind: str, method: str, params: dict[str, Any], splits: tuple[str, ...]
) -> dict[str, Any]:
    """Merge the ``kind`` experts with ``method``; the metrics per task on each of ``splits``
    and the merge's seconds, or ``{"error": ...}`` for a failure a local run records."""
    from splice.bench.merging import merge_backbones

    ctx: _LMContext = run_context(spec, _LMContext.build)
    try:
        state, secs = merge_backbones(
            method, params, ctx.folder, ctx.expert_folders(kind), seed=ctx.cfg.merge.seed
        )
        ev, out = ctx.ev(), {"seconds": secs}
        for i, split in enumerate(splits):  # the state loaded once
            out[split] = ev.evaluate(state if i == 0 else None, split)
        return out
    except (SpliceError, RuntimeError, ValueError) as e:
        return {"error": f"{type(e).__name__}: {e}"}
