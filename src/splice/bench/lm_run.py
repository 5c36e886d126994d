"""`splice bench` on a causal-LM pool: experts per text domain, merged, scored by held-out
loss / perplexity and greedy exact match (docs/bench-lm.md).

A config whose ``model`` resolves to a causal LM (config.json ``architectures`` ending in
``ForCausalLM``: ``model: smollm2``, an HF causal-LM folder) runs here instead of the
classifier bench (`bench.run.run_bench` dispatches). Order of work:

1. the methods (`bench.methods.select_methods`, the same rows as the classifier bench) and
   what does not apply to an LM pool, each with its reason (the linear probe, composition
   rows, coefficient searches, AdaMerging: they need classifier heads or the classifier
   evaluator); the output folder;
2. the tasks (`bench.lm_tasks`), the model, its validation / test parts prepared once;
3. the experts of each kind and, with ``baselines.multitask``, the multi-task model (one
   full fine-tune on the union of the tasks' train examples; `bench.lm_experts`, cached);
4. baselines on test: the pretrained model on every task, each expert on its own task, the
   multi-task model on every task (evaluated once; a "multi-task" row in each kind's
   table, normalized against that kind's experts, as the classifier bench's);
5. per kind and method: the sweep grid merged (`bench.merging.merge_backbones`, the real
   engine on the experts' HF folders) and scored on validation, the default and the best
   grid point ("tuned") on test. The data-aware methods (fisher, regmean, fisher_graft,
   regmean++, fw_merging; `bench.lm_stat_merging`) first collect each expert's statistics
   on its train sample (cached) and merge with them, on the same sweep. The selection
   score is the mean over tasks of the *normalized* validation score (`bench.lm_evaluate`:
   the loss gain share, exact match over the expert's), so loss and exact-match tasks weigh
   alike; tasks whose expert did not beat the pretrained model are left out of it. Test
   data never informs a choice.
6. results.json and results.md under ``out``.

Evaluation is in float32 (``precision`` applies to the classifier bench). With ``--ray``
(`bench.lm_ray_run`) the training (3) and each merge + evaluation of (5) run as Ray
units; the driver does the rest and assembles the same rows (`LMRunner` is the seam).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from splice.bench.config import BenchConfig
from splice.bench.experts import Expert
from splice.bench.lm_evaluate import (
    LMEvaluator,
    Metrics,
    normalized_exact_match,
    normalized_loss,
)
from splice.bench.lm_tasks import LMTaskData, prepare_lm_task
from splice.bench.methods import PlannedMethod, SkippedMethod, select_methods
from splice.errors import SpliceError

Scores = dict[str, Metrics]  # task -> metrics


def is_causal_lm(ref: str) -> bool:
    """Whether ``ref`` resolves to a causal LM (its config.json's architectures)."""
    from splice.train.models import ModelNotFoundError, resolve_model

    try:
        folder = resolve_model(ref)
    except ModelNotFoundError:
        return False  # the classifier bench reports it, after the config's own checks
    config = json.loads((folder / "config.json").read_text())
    return any(str(a).endswith("ForCausalLM") for a in config.get("architectures") or [])


@dataclass
class LMRow:
    kind: str
    group: str  # baseline | merged
    method: str
    test: Scores
    normalized: dict[str, float | None] = field(default_factory=dict)
    avg_normalized: float | None = None
    params: dict[str, Any] | None = None
    variant: str | None = None
    merge_seconds: float | None = None
    validation_score: float | None = None
    note: str | None = None  # how the row was made (the statistic rows: data, time, memory)
    peak_memory_mb: float | None = None  # the merge's peak RSS growth (statistic rows)


@dataclass
class LMBenchResults:
    config: dict[str, Any]
    tasks: dict[str, dict[str, Any]]
    pretrained: Scores
    experts: dict[str, dict[str, dict[str, Any]]]
    rows: list[LMRow]
    skipped: list[SkippedMethod]
    failed: list[dict[str, str]]
    seconds: dict[str, float]
    multitask: dict[str, Any] | None = None  # test scores, folder, cached, training record

    def to_json(self) -> dict[str, Any]:
        """As the classifier bench's results.json: the multi-task model under
        ``experts.multitask``."""
        out = asdict(self)
        out["skipped"] = [asdict(s) for s in self.skipped]
        multitask = out.pop("multitask")
        if multitask is not None:
            out["experts"]["multitask"] = multitask
        return out


def not_applicable(cfg: BenchConfig, planned: list[PlannedMethod]) -> list[SkippedMethod]:
    """What a config asks for that an LM pool does not run, each with its reason."""
    out = []
    if cfg.baselines.probe:
        out.append(SkippedMethod("linear probe", "classification only (a head on features)"))
    for row in cfg.compose or []:
        out.append(SkippedMethod(row, "composition rows route classifier experts' heads"))
    for m in cfg.search.methods:
        out.append(SkippedMethod(f"{m}+search", "coefficient search uses the classifier evaluator"))
    for p in planned:
        if p.data_aware:
            out.append(SkippedMethod(p.name, "AdaMerging's entropy objective needs a classifier"))
    return out


def multitask_note(info: dict[str, Any]) -> str:
    """How the multi-task row was made (its training record)."""
    return (
        f"one full fine-tune (full.lr) on the union of the tasks' train examples "
        f"({info.get('train_examples')} examples, {info.get('steps')} steps; its time: "
        f"results.json experts.multitask)"
    )


def score(test: Scores, experts: Scores, pretrained: Scores) -> dict[str, float | None]:
    """Normalized score per task (`bench.lm_evaluate`)."""
    out: dict[str, float | None] = {}
    for name, m in test.items():
        if "exact_match" in m:
            out[name] = normalized_exact_match(m["exact_match"], experts[name]["exact_match"])
        else:
            out[name] = normalized_loss(pretrained[name]["loss"], m["loss"], experts[name]["loss"])
    return out


def make_row(
    kind: str, experts: Scores, pretrained: Scores, group: str, method: str, test: Scores, **kw: Any
) -> LMRow:
    """A row of ``kind``'s table, scored against its experts."""
    norm = score(test, experts, pretrained)
    return LMRow(kind, group, method, test, norm, mean_defined(norm), **kw)


def mean_defined(values: dict[str, float | None]) -> float | None:
    got = [v for v in values.values() if v is not None and math.isfinite(v)]
    return sum(got) / len(got) if got else None


class LMRunner:
    """Where the experts train and the merges run: here, in order (`bench.lm_ray_run`'s
    subclass sends them to Ray as units; the rows are the same)."""

    def __init__(self, cfg: BenchConfig, ev: LMEvaluator, folder: Path, log: Any, progress: bool):
        self.cfg, self.ev, self.folder, self.log, self.progress = cfg, ev, folder, log, progress
        self.experts: dict[str, dict[str, Expert]] = {}
        self.multitask: Expert | None = None

    def train_experts(self, identity: dict[str, Any], tasks: list[LMTaskData]) -> None:
        """One expert per kind and task into ``self.experts`` and, with
        ``baselines.multitask``, the multi-task model into ``self.multitask`` (cache hits
        cost nothing)."""
        from splice.bench.lm_experts import get_lm_expert, get_lm_multitask

        for kind in self.cfg.kinds:
            self.experts[kind] = {}
            for t in tasks:
                self.log(f"{kind} expert {t.name}")
                self.experts[kind][t.name] = get_lm_expert(
                    self.folder, identity, t, kind, self.cfg, self.progress
                )
        if self.cfg.baselines.multitask:
            self.log("multi-task model")
            self.multitask = get_lm_multitask(self.folder, identity, tasks, self.cfg, self.progress)

    def start_merges(self, planned: list[PlannedMethod]) -> None:
        """Nothing here: a local run merges method by method in `method_rows`."""

    def method_rows(
        self, p: PlannedMethod, kind: str, row: Any, ex_val: Scores, pre_val: Scores
    ) -> list[LMRow] | str:
        """``p``'s rows in ``kind``'s table, or the error of a merge that failed."""
        folders = [e.folder for e in self.experts[kind].values()]
        try:
            if p.statistics is None:
                return _method_rows(
                    p, kind, self.cfg, self.ev, self.folder, folders, row, ex_val, pre_val
                )
            return self._stat_rows(p, kind, row, ex_val, pre_val)
        except (SpliceError, RuntimeError, ValueError) as e:
            return f"{type(e).__name__}: {e}"

    def _stat_rows(
        self, p: PlannedMethod, kind: str, row: Any, ex_val: Scores, pre_val: Scores
    ) -> list[LMRow]:
        """A statistic method's rows (`bench.lm_stat_merging`): each expert's statistics on
        its train sample (cached), then the sweep / default / tuned rows of any method,
        merged with them and annotated with the data, time and memory."""
        from splice.bench.lm_stat_merging import LMStatMerger

        self.log(f"{kind} {p.name}: statistics")
        ev, cfg = self.ev, self.cfg
        sm = LMStatMerger(
            ev, p, list(self.experts[kind].values()), cfg.training.max_length, self.folder,
            cfg.merge.seed,
        )  # fmt: skip
        if p.name == "fw_merging":
            return [sm.fw_row(variant, row) for variant in p.params["variant"]]
        rows = _method_rows(p, kind, cfg, ev, self.folder, [], row, ex_val, pre_val, merge=sm.merge)
        return sm.annotate(rows)


def run_lm_bench(
    cfg: BenchConfig, out: str | os.PathLike[str], progress: bool = True, on_ray: bool = False
) -> LMBenchResults:
    """The LM pool's run (the module docstring); ``on_ray``: experts and merges as Ray units
    (`bench.lm_ray_run`; Ray must be connected)."""
    from splice.bench.cache import model_identity
    from splice.bench.lm_experts import check_target_modules
    from splice.io.out_location import prepare_work_folder
    from splice.train.models import load_for_task, resolve_model

    start = time.perf_counter()
    out = Path(out)
    planned, skipped = select_methods(
        cfg.merge.methods, len(cfg.tasks), cfg.merge.params, cfg.merge.grids, cfg.merge.sweep
    )
    skipped += not_applicable(cfg, planned)
    planned = [p for p in planned if not p.data_aware]
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    prepare_work_folder(out)
    import transformers

    transformers.utils.logging.disable_progress_bar()  # one bar per weight load is noise
    tasks: list[LMTaskData] = [prepare_lm_task(t, cfg.data) for t in cfg.tasks]
    folder = resolve_model(cfg.model)
    model, tok, _ = load_for_task(str(folder), "causal_lm")
    if "lora" in cfg.kinds:
        check_target_modules(model, list(cfg.lora.target_modules))
    base_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ev = LMEvaluator(
        model, tok, tasks, cfg.training.max_length, cfg.eval_batch_size, cfg.lm.max_new_tokens
    )
    log = (lambda s: tqdm.write(f"splice bench: {s}")) if progress else (lambda s: None)
    pretrained = {"test": ev.evaluate(base_state, "test"), "val": ev.evaluate(None, "validation")}
    t_prep = time.perf_counter() - start
    if on_ray:
        from splice.bench.lm_ray_run import LMRayRunner

        runner: LMRunner = LMRayRunner(cfg, ev, folder, log, progress)
    else:
        runner = LMRunner(cfg, ev, folder, log, progress)
    runner.train_experts(model_identity(folder), tasks)
    experts = runner.experts
    t_train = time.perf_counter() - start - t_prep
    runner.start_merges(planned)
    mt_info: dict[str, Any] | None = None
    if runner.multitask is not None:
        mt = runner.multitask
        log("multi-task model: evaluate")
        mt_info = {
            "test": ev.evaluate(_load(mt.folder), "test"),
            "folder": str(mt.folder),
            "cached": mt.cached,
            **mt.meta,
        }
    rows: list[LMRow] = []
    failed: list[dict[str, str]] = []
    expert_info: dict[str, dict[str, dict[str, Any]]] = {}
    for kind in cfg.kinds:
        ex_test: Scores = {}
        ex_val: Scores = {}
        for name, e in experts[kind].items():
            state = _load(e.folder)
            ex_test[name] = ev.evaluate(state, "test", [name])[name]
            ex_val[name] = ev.evaluate(None, "validation", [name])[name]
        expert_info[kind] = {
            n: {
                "test": ex_test[n],
                "validation": ex_val[n],
                "folder": str(e.folder),
                "cached": e.cached,
                **{k: e.meta.get(k) for k in ("steps", "train_seconds")},
            }
            for n, e in experts[kind].items()
        }

        row = partial(make_row, kind, ex_test, pretrained["test"])
        rows.append(row("baseline", "pretrained", pretrained["test"]))
        rows.append(row("baseline", "experts", ex_test))
        if mt_info is not None:
            rows.append(
                row("baseline", "multi-task", mt_info["test"], note=multitask_note(mt_info))
            )
        for p in planned:
            if not p.applies_to(kind):
                continue
            log(f"{kind} {p.name}")
            got = runner.method_rows(p, kind, row, ex_val, pretrained["val"])
            if isinstance(got, str):
                log(f"{kind} {p.name} failed, skipped: {got}")
                failed.append({"kind": kind, "method": p.name, "error": got})
            else:
                rows.extend(got)
    results = LMBenchResults(
        config=cfg.model_dump(mode="json"),
        tasks={t.name: {"kind": t.kind, "sizes": t.sizes()} for t in tasks},
        pretrained=pretrained["test"],
        experts=expert_info,
        rows=rows,
        skipped=skipped,
        failed=failed,
        multitask=mt_info,
        seconds={
            "total": round(time.perf_counter() - start, 1),
            "prepare": round(t_prep, 1),
            "train": round(t_train, 1),
        },
    )
    from splice.bench.lm_report import render_markdown

    (out / "results.json").write_text(json.dumps(results.to_json(), indent=2, default=str) + "\n")
    (out / "results.md").write_text(render_markdown(results))
    return results


def _method_rows(
    p, kind, cfg, ev, base_folder, folders, row, ex_val, pre_val, merge=None
) -> list[LMRow]:
    """One method's default and tuned rows (tuned: best mean normalized validation score);
    ``merge(params) -> (state, seconds)`` defaults to the engine on ``folders``."""
    from splice.bench.merging import merge_backbones
    from splice.bench.methods import best_point

    if merge is None:

        def merge(params):
            return merge_backbones(p.name, params, base_folder, folders, seed=cfg.merge.seed)

    if p.sweep is None:
        state, secs = merge(p.params)
        test = ev.evaluate(state, "test")
        return [
            row(
                "merged",
                p.name,
                test,
                params=p.params,
                variant="default",
                merge_seconds=round(secs, 2),
            )
        ]
    param, default_value, _ = p.default_setting()
    best = None
    rows: list[LMRow] = []
    scores: list[float | None] = []
    for value in p.sweep[1]:
        params = {**p.params, param: value}
        state, secs = merge(params)
        val = mean_defined(score(ev.evaluate(state, "validation"), ex_val, pre_val))
        scores.append(val)
        if value == default_value:
            rows.append(
                row(
                    "merged",
                    p.name,
                    ev.evaluate(None, "test"),
                    params=params,
                    variant="default",
                    merge_seconds=round(secs, 2),
                    validation_score=val,
                )
            )
        if best_point(scores) == len(scores) - 1:  # keep only the best state
            best = (val, value, state, secs)
    if not rows:
        params = {**p.params, param: default_value}
        state, secs = merge(params)
        rows.append(
            row(
                "merged",
                p.name,
                ev.evaluate(state, "test"),
                params=params,
                variant="default",
                merge_seconds=round(secs, 2),
            )
        )
    if best is not None:
        val, value, state, secs = best
        rows.append(
            row(
                "merged",
                p.name,
                ev.evaluate(state, "test"),
                params={**p.params, param: value},
                variant="tuned",
                merge_seconds=round(secs, 2),
                validation_score=val,
            )
        )
    return rows


def _load(folder: Path) -> dict[str, torch.Tensor]:
    from splice.reference import open_checkpoint

    reader = open_checkpoint(str(folder))
    try:
        state = {n: reader.read(n).clone() for n in reader.names()}
    finally:
        reader.close()
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
