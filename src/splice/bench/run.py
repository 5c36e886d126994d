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
   the row is a copy, marked ``same_as_default``); then the coefficient searches
   (config ``search``, `bench.search`): "METHOD+search" rows;
6. the composition rows (`bench.routing`, config ``compose``): the LoRA experts kept
   unmerged and chosen per example (oracle: task id given; retrieval: by centroid
   similarity; lorahub: one searched composition per task; gate: a trained gate,
   `bench.gating`; fusion: AdapterFusion per task, `bench.fusing`; both cached), each with
   its measured inference cost relative to the pretrained model; ``twin_merging``
   (`bench.twin`) is a composition row of every kind: shared merge + routed per-task
   exclusive knowledge;
7. the tables scored against each kind's experts, written with the sweeps, the skipped and
   failed methods and the timing (`results.BenchResults`, `report.write_outputs`).

Selection uses the average validation accuracy over tasks; test labels never inform a
choice. The one use of test data: AdaMerging rows (``adamerging``, ``adamerging++``,
`splice.bench.adamerging`) learn their coefficients on the test *inputs* without labels,
the paper's test-time protocol, said in each such row's note. Outputs: results.json,
results.md, accuracy_by_method.png, accuracy_vs_coefficient.png under ``out``.

With ``ray`` (`splice bench --ray`) the training (3), the merges (5) and the searches'
candidates run as Ray tasks (`splice.bench.ray_run`; a causal-LM pool's training and
merges: `splice.bench.lm_ray_run`); the rows are the same.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

import splice
from splice.bench import report
from splice.bench.backbone import Base, prepare_base
from splice.bench.config import TWIN_ROW, BenchConfig
from splice.bench.evaluate import Evaluator, train_probe_heads
from splice.bench.experts import Expert, get_expert
from splice.bench.merging import merge_backbones
from splice.bench.methods import PlannedMethod, best_point, select_methods
from splice.bench.precision import resolve_precision
from splice.bench.results import (
    BenchResults,
    ExpertResult,
    Failure,
    MultitaskResult,
    Row,
    Sweep,
    SweepPoint,
    TaskSummary,
    Timing,
)
from splice.bench.search import check_validation_data, plan_searches, run_searches
from splice.bench.stat_merging import check_stat_data, stat_units
from splice.bench.tasks import TaskData, prepare_task
from splice.errors import SpliceError
from splice.io.out_location import prepare_work_folder

WEAK_MARGIN = 0.1  # an expert this close to chance accuracy is flagged


def run_bench(
    cfg: BenchConfig,
    out: str | os.PathLike[str],
    progress: bool = True,
    ray: str | None = None,
) -> BenchResults:
    """Run the whole benchmark (see the module docstring); returns its results, also written
    under ``out``. ``ray``: run the training and merge units as Ray tasks on the cluster at
    that address (``"local"``: a local instance; `splice.bench.ray_run`), same results. A
    causal-LM ``model`` runs the LM pool instead (`bench.lm_run`; on Ray: `bench.lm_ray_run`)."""
    from splice.bench.lm_run import is_causal_lm, run_lm_bench

    run = run_lm_bench if is_causal_lm(cfg.model) else _run_bench
    if ray is None:
        return run(cfg, out, progress, False)  # type: ignore[return-value]
    from splice.engine.ray_pool import ray_session

    with ray_session(ray):  # the connection checked before any work
        return run(cfg, out, progress, True)  # type: ignore[return-value]


def _run_bench(
    cfg: BenchConfig, out: str | os.PathLike[str], progress: bool, on_ray: bool
) -> BenchResults:
    start = time.perf_counter()
    out = Path(out)  # 1. the methods, the output folder
    planned, skipped = select_methods(
        cfg.merge.methods, len(cfg.tasks), cfg.merge.params, cfg.merge.grids, cfg.merge.sweep
    )
    searched = plan_searches(cfg.search, len(cfg.tasks), cfg.merge.params)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    precision = resolve_precision(cfg.precision)
    prepare_work_folder(out)  # a clear error before any heavy work
    if on_ray:
        from splice.bench.ray_run import RayRunner

        runner: _Runner = RayRunner(cfg, progress)
    else:
        runner = _Runner(cfg, progress)
    total = _units(planned, cfg.kinds, len(cfg.tasks), cfg)
    with tqdm(
        total=total, desc="bench", unit="step", disable=not progress, dynamic_ncols=True
    ) as bar:
        runner.bar = bar
        runner.step("load data")  # 2. data, the pretrained backbone, the evaluator
        tasks: list[TaskData] = [prepare_task(t, cfg.data) for t in cfg.tasks]
        if searched:
            check_validation_data(tasks)
        check_stat_data(planned, tasks)  # data-aware rows need train data (bench.stat_merging)
        base = prepare_base(cfg.model, cfg.training.seed)
        ev = Evaluator(
            base, tasks, cfg.training.max_length, cfg.eval_batch_size, precision=precision
        )
        t_prep = time.perf_counter() - start
        experts, mt = runner.train_experts(base, tasks)  # 3. experts
        t_train = time.perf_counter() - start - t_prep
        expert_results = runner.baselines(ev, experts)  # 4. baselines
        multitask = runner.multitask_baseline(ev, mt)
        runner.merge_all(planned, ev, base.folder, experts)  # 5. merges
        run_searches(  # 5b. coefficient searches ("ties+search", bench.search)
            runner, cfg.kinds, searched, cfg.search, ev, base.folder, experts, cfg.merge.seed, out
        )
        if [r for r in cfg.compose_rows if r != TWIN_ROW]:  # 6. composition rows
            runner.compose(ev, experts["lora"])
        if TWIN_ROW in cfg.compose_rows:  # 6b. Twin-Merging, every kind (bench.twin)
            for kind in cfg.kinds:
                runner.twin(ev, kind, base.folder, experts[kind])
    results = BenchResults(  # 7. outputs
        config=cfg.model_dump(mode="json"),
        machine=machine(),
        precision=precision,
        tasks={t.name: TaskSummary(t.num_classes, t.sizes(), list(t.label_names)) for t in tasks},
        experts=expert_results,
        multitask=multitask,
        tables={
            kind: report.section_rows(
                runner.rows, kind, {n: e.test for n, e in expert_results[kind].items()}
            )
            for kind in cfg.kinds
        },
        sweeps=runner.sweeps,
        methods=planned,
        skipped=skipped,
        failed=runner.failed,
        timing=Timing(time.perf_counter() - start, t_prep, t_train),
    )
    report.write_outputs(out, results)
    return results


class _Runner:
    """The run's steps and what they record: rows, sweeps, failures; one progress bar."""

    def __init__(self, cfg: BenchConfig, progress: bool):
        self.cfg = cfg
        self.progress = progress
        self.rows: list[Row] = []
        self.sweeps: list[Sweep] = []
        self.failed: list[Failure] = []
        self.units = 0
        self.bar: Any = None

    def step(self, what: str) -> None:
        self.bar.set_description(what)

    def done(self, n: int = 1) -> None:
        self.units += n
        self.bar.update(n)

    # -- experts --------------------------------------------------------------------------
    def train_experts(
        self, base: Base, tasks: list[TaskData]
    ) -> tuple[dict[str, dict[str, Expert]], Expert | None]:
        """One expert per kind and task, and the multi-task model (cache hits cost nothing)."""
        experts: dict[str, dict[str, Expert]] = {}
        for kind in self.cfg.kinds:
            experts[kind] = {}
            for task in tasks:
                self.step(f"train {kind} {task.name}")
                experts[kind][task.name] = get_expert(base, [task], kind, self.cfg, self.progress)
                self.done()
        mt = None
        if self.cfg.baselines.multitask:
            self.step("train multi-task")
            mt = get_expert(base, tasks, "multitask", self.cfg, self.progress)
            self.done()
        return experts, mt

    # -- baselines ------------------------------------------------------------------------
    def baselines(
        self, ev: Evaluator, experts: dict[str, dict[str, Expert]]
    ) -> dict[str, dict[str, ExpertResult]]:
        """Per kind: each expert on its own task, the pretrained backbone with the experts'
        heads; then the linear probe (shared by every kind)."""
        base_state = ev.base.backbone_state()
        info: dict[str, dict[str, ExpertResult]] = {}
        for kind, pool in experts.items():
            self.step(f"{kind} experts: evaluate")
            info[kind] = {name: self._expert_result(ev, kind, name, e) for name, e in pool.items()}
            test = {name: e.test for name, e in info[kind].items()}
            val = {name: e.validation for name, e in info[kind].items()}
            self.rows.append(Row(kind, "baseline", "experts", test, validation=val))
            heads = {name: e.heads[name] for name, e in pool.items()}
            zero = ev.evaluate(base_state, heads, "test")
            self.rows.append(Row(kind, "baseline", "pretrained + expert heads", zero))
            self.done()
        if self.cfg.baselines.probe:
            self.step("linear probe")
            probe = train_probe_heads(ev, base_state, seed=self.cfg.training.seed)
            test = ev.evaluate(base_state, probe, "test")
            self.rows.append(Row("shared", "baseline", "linear probe", test))
        self.done()
        return info

    def _expert_result(self, ev: Evaluator, kind: str, name: str, e: Expert) -> ExpertResult:
        state = _load(e)
        result = ExpertResult(
            test=ev.evaluate(state, e.heads, "test", [name])[name],
            validation=ev.evaluate(state, e.heads, "validation", [name])[name],
            chance=1 / ev.tasks[name].num_classes,
            cached=e.cached,
            folder=str(e.folder),
            **{k: e.meta.get(k) for k in ("steps", "train_seconds", "steps_per_second")},
        )
        if result.margin_over_chance < WEAK_MARGIN:
            tqdm.write(
                f"splice bench: warning: the {kind} expert of {name} is within "
                f"{WEAK_MARGIN:.0%} of chance ({result.test:.1%}); its normalized "
                "accuracies say little (more data, epochs or a higher lr?)"
            )
        return result

    def multitask_baseline(self, ev: Evaluator, mt: Expert | None) -> MultitaskResult | None:
        result = None
        if mt is not None:
            self.step("multi-task: evaluate")
            test = ev.evaluate(_load(mt), mt.heads, "test")
            self.rows.append(Row("shared", "baseline", "multi-task", test))
            result = MultitaskResult(test, mt.cached, mt.meta)
        self.done()
        return result

    # -- merges ---------------------------------------------------------------------------
    def merge_all(
        self,
        planned: list[PlannedMethod],
        ev: Evaluator,
        base_folder: Path,
        experts: dict[str, dict[str, Expert]],
    ) -> None:
        """Every kind's merge rows, method by method."""
        for kind in self.cfg.kinds:
            pool = [experts[kind][t] for t in ev.tasks]
            for p in planned:
                if p.applies_to(kind):
                    self.merge_method(kind, p, ev, base_folder, pool)

    def search_evaluator(self, kind: str, method: str, objective: str) -> Any:
        """Where a search's candidates are evaluated: None, here (`bench.ray_run` overrides)."""
        return None

    def merge_method(
        self, kind: str, p: PlannedMethod, ev: Evaluator, base_folder: Path, pool: list[Expert]
    ) -> None:
        """Run one method (its sweep, default and tuned rows). A method that fails on this
        pool (a merge error, a numerical failure) is recorded in ``failed`` with its message
        and the run goes on; its rows are kept only if all of them succeeded."""
        expected = _method_units(p)
        before = self.units
        try:
            if p.statistics is not None:
                rows, sweep = self._stat_merge(kind, p, ev, base_folder, pool)
            elif p.data_aware:
                rows, sweep = self._adamerging(kind, p, ev, base_folder, pool), None
            else:
                rows, sweep = self._merge_method(kind, p, ev, base_folder, pool)
        except (SpliceError, RuntimeError, ValueError) as e:
            msg = f"{type(e).__name__}: {e}"
            tqdm.write(f"splice bench: {kind} {p.name} failed, skipped: {msg}")
            self.failed.append(Failure(kind, p.name, msg))
            self.done(expected - (self.units - before))
            return
        self.rows.extend(rows)
        if sweep is not None:
            self.sweeps.append(sweep)

    def _merge_method(
        self,
        kind: str,
        p: PlannedMethod,
        ev: Evaluator,
        base_folder: Path,
        pool: list[Expert],
        merger: Any = None,
    ) -> tuple[list[Row], Sweep | None]:
        """The sweep, default and tuned rows; ``merger(params) -> (state, seconds)`` replaces
        the engine merge (the data-aware methods)."""
        folders = [e.folder for e in pool]
        heads = {e.tasks[0]: e.heads[e.tasks[0]] for e in pool}
        seed = self.cfg.merge.seed

        def merge(params: dict[str, Any]) -> tuple[dict, float]:
            if merger is not None:
                return merger(params)
            return merge_backbones(p.name, params, base_folder, folders, seed=seed)

        def test_row(state: dict, params: dict[str, Any], variant: str, secs: float, val=None):
            """The merged backbone's row: its test accuracy per task, and how it was made."""
            test = ev.evaluate(state, heads, "test")
            return Row(kind, "merged", p.name, test, params, variant, round(secs, 2), val)

        if p.sweep is None:
            self.step(f"{kind} {p.name}")
            state, secs = merge(p.params)
            self.done()
            return [test_row(state, p.params, "default", secs)], None
        param, default_value, default_params = p.default_setting()
        points: list[SweepPoint] = []
        best, default_row = None, None
        for value in p.sweep[1]:
            self.step(f"{kind} {p.name} {param}={value}")
            state, secs = merge({**p.params, param: value})
            val = ev.evaluate(state, heads, "validation")
            points.append(SweepPoint(value, _mean(val), val, secs))
            if value == default_value:
                default_row = test_row(state, default_params, "default", secs, val)
            if best_point([q.avg for q in points]) == len(points) - 1:  # keep only the best
                best = (value, state, secs, val)
            self.done()
        self.step(f"{kind} {p.name} default")
        if default_row is None:
            state, secs = merge(default_params)
            default_row = test_row(state, default_params, "default", secs)
        self.done()
        assert best is not None
        value, state, secs, val = best
        if value == default_value:
            tuned = dataclasses.replace(default_row, variant="tuned", same_as_default=True)
        else:
            self.step(f"{kind} {p.name} tuned")
            tuned = test_row(state, {**p.params, param: value}, "tuned", secs, val)
        self.done()
        sweep = Sweep(kind, p.name, param, default_value, value, points)
        return [default_row, tuned], sweep

    def _stat_merge(
        self, kind: str, p: PlannedMethod, ev: Evaluator, base_folder: Path, pool: list[Expert]
    ) -> tuple[list[Row], Sweep | None]:
        """A method run on the experts' train data (`splice.bench.stat_merging`): the
        statistics (cached), then its sweep / default / tuned rows or FW's variant rows."""
        from splice.bench.stat_merging import StatMerger

        self.step(f"{kind} {p.name}: statistics")
        sm = StatMerger(ev, p, pool, base_folder)
        if p.name == "fw_merging":
            rows = []
            for variant in p.params["variant"]:
                self.step(f"{kind} {p.name} {variant}")
                rows.append(sm.fw_row(kind, variant))
                self.done()
            return rows, None
        rows, sweep = self._merge_method(kind, p, ev, base_folder, pool, sm.merge)
        return sm.annotate(rows), sweep

    def _adamerging(
        self, kind: str, p: PlannedMethod, ev: Evaluator, base_folder: Path, pool: list[Expert]
    ) -> list[Row]:
        """AdaMerging's rows (`splice.bench.adamerging`): one per granularity, each learned
        on the unlabeled test inputs and scored on the test split."""
        from safetensors.torch import load_file

        from splice.bench.adamerging import (
            AdaMergingSettings,
            learn_merge,
            resolve_schedule,
            row_note,
            row_params,
        )

        settings = AdaMergingSettings(**p.params)  # checked by select_methods
        settings = resolve_schedule(settings, [e.meta.get("steps") for e in pool])
        tasks = [e.tasks[0] for e in pool]
        heads = {e.tasks[0]: e.heads[e.tasks[0]] for e in pool}
        base = load_file(str(base_folder / "model.safetensors"))
        states = [_load(e) for e in pool]
        seconds = [e.meta.get("train_seconds") for e in pool]
        rows = []
        for g in settings.granularity:
            self.step(f"{kind} {p.name} {g}-wise")
            res = learn_merge(ev, p.name, settings, g, base, states, heads, tasks)
            test = ev.evaluate(res.state, heads, "test")
            params = row_params(p.name, settings, g)
            note = row_note(res, tasks, seconds)
            rows.append(
                Row(kind, "merged", p.name, test, params, None, round(res.seconds, 2), note=note)
            )
            self.done()
        return rows

    # -- composition ----------------------------------------------------------------------
    def compose(self, ev: Evaluator, pool: dict[str, Expert]) -> None:
        """The composition rows on the LoRA experts (`splice.bench.routing`); a failure is
        recorded as a merge's is, and the run goes on."""
        rows = [r for r in self.cfg.compose_rows if r != TWIN_ROW]
        before = self.units
        try:
            self._compose(ev, pool, rows)
        except (SpliceError, RuntimeError, ValueError) as e:
            msg = f"{type(e).__name__}: {e}"
            tqdm.write(f"splice bench: lora composition rows failed, skipped: {msg}")
            self.failed.append(Failure("lora", "+".join(rows), msg))
            self.done(len(rows) - (self.units - before))

    def twin(self, ev: Evaluator, kind: str, base_folder: Path, pool: dict[str, Expert]) -> None:
        """The ``twin_merging`` row of ``kind`` (`splice.bench.twin`); a failure is recorded
        as a merge's is, and the run goes on."""
        from splice.bench.routing import base_forward_seconds
        from splice.bench.twin import run_twin, twin_note

        self.step(f"{kind} twin_merging")
        s = self.cfg.twin
        try:
            heads = {name: e.heads[name] for name, e in pool.items()}
            base_state = ev.base.backbone_state()
            reference = base_forward_seconds(ev, base_state)
            res = run_twin(ev, base_folder, pool, s, heads, self.cfg.merge.seed)
            reference = (reference + base_forward_seconds(ev, base_state)) / 2
        except (SpliceError, RuntimeError, ValueError) as e:
            msg = f"{type(e).__name__}: {e}"
            tqdm.write(f"splice bench: {kind} twin_merging failed, skipped: {msg}")
            self.failed.append(Failure(kind, TWIN_ROW, msg))
        else:
            size = {"rank": s.rank} if s.rank else {"fraction": s.fraction}
            params = {"shared": s.shared, **size, **({"top_k": s.top_k} if s.top_k else {})}
            if s.router_features != "last":  # the paper's is not named
                params["router"] = s.router_features
            self.rows.append(
                Row(
                    kind,
                    "composed",
                    TWIN_ROW,
                    res.test,
                    params,
                    inference_cost=round(res.seconds / reference, 2),
                    routing=res.routing,
                    note=twin_note(res, s),
                )
            )
        self.done()

    def _compose(self, ev: Evaluator, pool: dict[str, Expert], which: list[str]) -> None:
        from splice.bench.routing import RoutedModel, base_forward_seconds

        self.step("lora composition: load the adapters")
        heads = {name: e.heads[name] for name, e in pool.items()}
        base_state = ev.base.backbone_state()
        routed = RoutedModel(ev, pool)
        reference = base_forward_seconds(ev, base_state)
        results: dict[str, tuple[Any, ...]] = {}
        for what in [w for w in which if w != TWIN_ROW]:
            self.step(f"lora {what}")
            if what == "oracle":
                results[what] = (routed.oracle(heads), None)
            elif what == "retrieval":
                r = self.cfg.retrieval
                centroids = routed.centroids()
                params = {"k": r.k, "temperature": r.temperature}
                results[what] = (routed.retrieval(heads, centroids, r.k, r.temperature), params)
            elif what == "lorahub":
                h = self.cfg.lorahub
                found = routed.lorahub(heads, h.examples, h.budget, h.seed)
                results[what] = (found, {"examples": h.examples, "budget": h.budget})
            else:  # trained over the experts, cached: bench.gating, bench.fusing
                results.update(self._trained(what, routed, pool, heads))
            self.done()
        reference = (reference + base_forward_seconds(ev, base_state)) / 2
        for what, (res, params, *note) in results.items():
            cost = round(res.seconds / reference, 2)
            name = f"{what} routing" if what in ("oracle", "retrieval") else what
            self.rows.append(
                Row(
                    "lora",
                    "composed",
                    name,
                    res.test,
                    params,
                    inference_cost=cost,
                    routing=res.routing,
                    weights=res.weights,
                    note=note[0] if note else None,
                )
            )

    def _trained(self, what: str, routed: Any, pool: dict[str, Expert], heads: dict) -> dict:
        """The gate rows (one per level) or the fusion row: row name -> (result, params,
        note)."""
        from splice.bench import fusing, gating

        if what == "gate":
            g, out = self.cfg.gate, {}
            for level in g.levels:
                mixture, meta = gating.get_gate(routed, pool, heads, self.cfg, level, self.progress)
                params = {"top_k": g.top_k, "balance_coef": g.balance_coef}
                res = gating.gate_result(routed, mixture, heads)
                out[f"gate ({level})"] = (res, params, gating.gate_note(meta))
            return out
        fused, metas = {}, []
        for task in heads:
            block, head, meta = fusing.get_fusion(
                routed, pool, heads, self.cfg, task, self.progress
            )
            fused[task] = (block, head)
            metas.append(meta)
        res = fusing.fusion_result(routed, fused)
        return {"fusion": (res, {"lr": self.cfg.fusion.lr}, fusing.fusion_note(metas))}


def _load(e: Expert) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(e.folder / "model.safetensors"))


def _mean(d: dict[str, float]) -> float:
    return sum(d.values()) / len(d)


def _method_units(p: PlannedMethod) -> int:
    """Progress units of one method on one kind: its sweep, default and tuned merges;
    AdaMerging's rows."""
    if p.statistics is not None:
        return stat_units(p)
    if p.data_aware:
        return len(p.params["granularity"])
    return (len(p.sweep[1]) + 2) if p.sweep else 1


def _units(planned: list[PlannedMethod], kinds: list[str], n_tasks: int, cfg: BenchConfig) -> int:
    merges = sum(_method_units(p) for k in kinds for p in planned if p.applies_to(k))
    train = n_tasks * len(kinds) + int(cfg.baselines.multitask)
    # + probe, multitask eval, per-kind baselines, composition rows
    searches = len(cfg.search.methods) * len(kinds)
    twin = len(kinds) if TWIN_ROW in cfg.compose_rows else 0
    lora_rows = len(cfg.compose_rows) - (TWIN_ROW in cfg.compose_rows)
    return merges + searches + train + 2 + len(kinds) + lora_rows + twin


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
