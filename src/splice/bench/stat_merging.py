"""Data-aware merge rows of `splice bench`: statistics from each expert's own training data.

``merge.methods`` may name ``fisher``, ``regmean``, ``regmean++``, ``fisher_graft`` and
``fw_merging`` (not part of ``core`` or ``all``: each runs its experts on data). They merge
the same expert backbones as the data-free rows, on both kinds (a LoRA expert is folded into
its base, so its backbone is a full state dict and the same methods apply). The data:
expert k's own task's *train* split (never validation or test), a seeded sample of
``examples`` examples (default 256: FusionBench's ``num_fisher_examples`` /
``num_regmean_examples`` default; the RegMean paper is recalled to use about 1000 training
examples per task, not re-checked here; 256 is a proper subset of every train split of
benchmarks/bench_4tasks.yaml, the smallest being spam's 400, and costs seconds per expert),
run through expert k (its backbone and its own head).

- ``fisher`` (Matena & Raffel 2022): the diagonal empirical Fisher of each expert
  (`collect_fisher`, per-example squared gradients of the cross-entropy of the true label),
  merged by `splice.merge.methods.fisher` (models normalized by their Fisher's norm, floor
  1e-6, equal weights). No sweep (the paper's tuned per-model weights are not swept).
- ``regmean`` (Jin et al. 2023): the Gram X^T X / rows of the inputs of every linear layer of
  the backbone (the head excluded; `collect_gram`), merged by `splice.merge.methods.regmean`;
  α (the off-diagonal scaling) is tuned on validation over [0.1, 0.5, 0.9, 1.0] (the paper
  tunes α on validation; 0.9 is splice's default and the authors' script's, 0.1 FusionBench's
  text configs', 1.0 the exact least-squares merge).
- ``regmean++`` (Nguyen et al. 2025): RegMean whose Grams are taken block by block on the
  merged model's activations (`splice.merge.regmean_plusplus`), on the backbone module (the
  heads differ per task); same α grid as RegMean. Its statistics depend on the merge, so
  they are not cached; its merge time includes the data passes.
- ``fisher_graft`` (Fast Fisher Grafting, Mahdavinia et al. 2025): the Fisher above (the
  same cached files as ``fisher``), each task vector kept at its ``density`` 0.2 entries of
  largest F·δ² (the TIES / magnitude-prune rows' k = 20%, so the rows differ only in the
  saliency), then task arithmetic; λ tuned on validation over the task-arithmetic grid.
- ``fw_merging`` (Chen et al. 2025): Frank-Wolfe over the experts (`splice.merge.frank_wolfe`),
  one row per ``variant`` (hard, soft); the objective of task k is the cross-entropy of the
  merged backbone with expert k's head on one batch of task k's sample per iteration (the
  batches cycle), 10 iterations (splice's default), the cosine oracle at model granularity;
  hard starts from task arithmetic (λ 1), soft from the base, as the authors' starts.

Statistics are cached like experts (`splice.bench.cache`): one safetensors file per (expert,
statistic, data settings) under ``bench/stats``, written atomically, with the collection's
wall time and peak memory in its metadata, so a rerun skips the data pass and still reports
them. Each row's ``merge_seconds`` is the merge (for regmean++ and fw_merging: including
their data passes), ``peak_memory_mb`` its peak RSS growth (`splice.bench.memory`); the note
gives the data, the statistics' time and peak memory and whether they came from the cache.
Per-example Fisher is collected in batches of one (the same Fisher as larger batches: the
per-example gradients do not depend on the batch, and each backward pass then costs one
example instead of a whole batch's graph).
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import Field

from splice.bench.memory import PeakRSS
from splice.config_errors import StrictConfig, parse_config
from splice.errors import SpliceError

if TYPE_CHECKING:
    from splice.bench.evaluate import Evaluator
    from splice.bench.experts import Expert
    from splice.bench.methods import PlannedMethod
    from splice.bench.results import Row
    from splice.bench.tasks import TaskData

STAT_METHODS = ("fisher", "regmean", "regmean++", "fisher_graft", "fw_merging")
ALPHA_GRID = [0.1, 0.5, 0.9, 1.0]
LAMBDA_GRID = [0.3, 0.5, 0.7, 1.0]  # = methods.SUM_GRID (task-vector sums)
DATA_KEYS = ("examples", "batch_size", "seed", "per_example")


class _Data(StrictConfig):
    examples: int = Field(256, gt=0)  # per task, from its train split
    batch_size: int = Field(16, gt=0)
    seed: int = 0


class FisherSettings(_Data):
    per_example: bool = True
    normalize: bool = True
    floor: float = Field(1e-6, ge=0)


class RegMeanSettings(_Data):
    alpha: float = Field(0.9, ge=0, le=1)


class GraftSettings(_Data):
    per_example: bool = True
    density: float = Field(0.2, gt=0, le=1)
    # fisher_graft's "lambda" (a Python keyword) is set through merge.params / grids
    lambda_: float = Field(1.0, alias="lambda", ge=0)


class FWSettings(_Data):
    variant: list[Literal["hard", "soft"]] = Field(
        default_factory=lambda: ["hard", "soft"], min_length=1
    )
    iterations: int = Field(10, gt=0)
    oracle: Literal["cosine", "inner"] = "cosine"
    granularity: Literal["model", "tensor"] = "model"
    soft_scaling: float = Field(0.3, gt=0)


SETTINGS: dict[str, type[_Data]] = {
    "fisher": FisherSettings,
    "regmean": RegMeanSettings,
    "regmean++": RegMeanSettings,
    "fisher_graft": GraftSettings,
    "fw_merging": FWSettings,
}
SWEEPS: dict[str, tuple[str, list[Any]]] = {
    "regmean": ("alpha", ALPHA_GRID),
    "regmean++": ("alpha", ALPHA_GRID),
    "fisher_graft": ("lambda", LAMBDA_GRID),
}


def parse_stat_settings(method: str, given: dict[str, Any]) -> tuple[dict, dict]:
    """``merge.params.<method>`` checked: (data settings, merge parameters)."""
    s = parse_config(
        SETTINGS[method], given, f"merge.params.{method}", SpliceError, list_valid=True
    )
    dumped = s.model_dump(by_alias=True)
    data = {k: v for k, v in dumped.items() if k in DATA_KEYS}
    return data, {k: v for k, v in dumped.items() if k not in DATA_KEYS}


def plan_stat_method(
    method: str, given: dict[str, Any], grid: dict[str, list[Any]] | None, sweep: bool
) -> PlannedMethod:
    """The planned row(s) of a data-aware method (``merge.grids`` may replace its sweep)."""
    from splice.bench.methods import PlannedMethod

    data, params = parse_stat_settings(method, given)
    chosen = SWEEPS.get(method)
    if grid:
        param, values = next(iter(grid.items()))
        if method not in SWEEPS or param != SWEEPS[method][0]:
            what = f"sweeps {SWEEPS[method][0]}" if method in SWEEPS else "has no sweep"
            raise SpliceError(f"merge.grids.{method}: '{param}': {method} {what}")
        for v in values:
            parse_stat_settings(method, {**given, param: v})
        chosen = (param, list(values))
    return PlannedMethod(method, params, chosen if sweep else None, False, statistics=data)


def check_stat_data(planned: list[PlannedMethod], tasks: list[TaskData]) -> None:
    """Every task has training examples for the named data-aware methods (before training)."""
    names = [p.name for p in planned if p.statistics is not None]
    if not names:
        return
    for t in tasks:
        if len(t.parts["train"]) == 0:
            raise SpliceError(
                f"merge.methods names {', '.join(names)}, which run each expert on its task's "
                f"train split; task {t.name} has no training examples"
            )


def stat_units(p: PlannedMethod) -> int:
    if p.name == "fw_merging":
        return len(p.params["variant"])
    return (len(p.sweep[1]) + 2) if p.sweep else 1


class StatMerger:
    """One data-aware method on one kind's pool: its statistics (cached) and its merges."""

    def __init__(self, ev: Evaluator, p: PlannedMethod, pool: list[Expert], base_folder: Path):
        from safetensors.torch import load_file

        self.ev, self.p, self.pool = ev, p, pool
        self.data = dict(p.statistics or {})
        self.tasks = [e.tasks[0] for e in pool]
        check_heads(ev, pool)
        self.base = load_file(str(base_folder / "model.safetensors"))
        self.states = [load_file(str(e.folder / "model.safetensors")) for e in pool]
        self.peaks: dict[str, float] = {}
        self.stats: list[dict[str, torch.Tensor]] = []
        self.info: list[dict[str, str]] = []
        kind = {"fisher": "fisher", "fisher_graft": "fisher", "regmean": "gram"}.get(p.name)
        if kind is not None:
            for e in pool:
                stats, info = expert_statistics(ev, e, kind, self.data)
                self.stats.append(stats)
                self.info.append(info)

    # -- merges ---------------------------------------------------------------------------
    def merge(self, params: dict[str, Any]) -> tuple[dict[str, torch.Tensor], float]:
        """The merged backbone for ``params`` and its seconds; records its peak memory."""
        from splice.merge.data_merge import merge_with_statistics

        with PeakRSS() as mem:
            start = time.perf_counter()
            if self.p.name == "regmean++":
                state = self._regmean_plusplus(params["alpha"])
            else:
                extra = {"base": self.base} if self.p.name == "fisher_graft" else {}
                state = merge_with_statistics(
                    self.p.name, self.states, self.stats, **extra, **params
                )
            secs = time.perf_counter() - start
        self.peaks[_key(params)] = mem.mb
        return _float(state), secs

    def _regmean_plusplus(self, alpha: float) -> dict[str, torch.Tensor]:
        from splice.merge.regmean_plusplus import regmean_plusplus

        models = [expert_model(self.ev, e) for e in self.pool]
        prefix = models[0].base_model_prefix
        inner = [getattr(m, prefix) for m in models]
        batches = [[_inputs(b) for b in sample_batches(self.ev, t, self.data)] for t in self.tasks]
        merged = regmean_plusplus(inner, batches, alpha=alpha)
        out = {}
        for name in self.base:
            short = name[len(prefix) + 1 :] if name.startswith(prefix + ".") else None
            if short is None or short not in merged:
                raise SpliceError(f"regmean++: backbone tensor '{name}' is outside {prefix}")
            out[name] = merged[short]
        return out

    def fw_row(self, kind: str, variant: str) -> Row:
        """FW-Merging's row for ``variant`` (hard / soft), scored on test."""
        from torch.func import functional_call

        from splice.bench.results import Row

        ev, params = self.ev, self.p.params
        head = ev.base.head_name + "."
        heads = {t: e.heads[t] for t, e in zip(self.tasks, self.pool, strict=True)}
        samples = [sample_batches(ev, t, self.data) for t in self.tasks]
        calls = [0] * len(self.tasks)

        def objective(k: int) -> Callable[[torch.nn.Module], torch.Tensor]:
            weights = {head + n: v.float() for n, v in heads[self.tasks[k]].items()}

            def loss(model: torch.nn.Module) -> torch.Tensor:
                batch = samples[k][calls[k] % len(samples[k])]
                calls[k] += 1
                out = functional_call(model, weights, args=(), kwargs=_inputs(batch))
                return torch.nn.functional.cross_entropy(out.logits.float(), batch["labels"])

            return loss

        res, secs, peak_mb = run_fw_merge(
            ev.model, self.base, self.states, [objective(k) for k in range(len(self.tasks))],
            variant, params,
        )  # fmt: skip
        test = ev.evaluate(_float(res.state_dict), heads, "test")
        shown = {"variant": variant, "iterations": params["iterations"]}
        picks = "; ".join(",".join(self.tasks[i] if i < len(self.tasks) else "start"
                                   for i in it) for it in res.picks)  # fmt: skip
        note = (
            f"{self._data_note()}; one batch of {self.data['batch_size']} per task and "
            f"iteration; picks per iteration: {picks}; objective "
            f"{res.losses[0]:.3f} -> {res.losses[-1]:.3f}; peak memory +{peak_mb:.0f} MiB"
        )
        return Row(
            kind, "merged", "fw_merging", test, shown, None, round(secs, 2), note=note,
            peak_memory_mb=peak_mb,
        )  # fmt: skip

    # -- rows -----------------------------------------------------------------------------
    def annotate(self, rows: list[Row]) -> list[Row]:
        """Rows of the sweep path with their peak memory and the data note."""
        out = []
        for r in rows:
            peak = self.peaks.get(_key(r.params or {}))
            note = self._data_note()
            if peak is not None:
                note += f"; merge peak memory +{peak:.0f} MiB"
            out.append(dataclasses.replace(r, note=note, peak_memory_mb=peak))
        return out

    def _data_note(self) -> str:
        return data_note(self.data, self.info)


def data_note(data: dict[str, Any], info: list[dict[str, str]]) -> str:
    """A stat row's note: the data, and the statistics' collection time, peak memory and
    cache hits over the experts (``info``: `expert_statistics`' metadata per expert)."""
    n = data["examples"]
    note = f"data: up to {n} train examples per task (seed {data['seed']})"
    if info:
        kind = info[0]["kind"]
        secs = sum(float(i["seconds"]) for i in info)
        peak = max(float(i["peak_mb"]) for i in info)
        cached = sum(i["cached"] == "true" for i in info)
        note += (
            f"; {kind} statistics collected in {secs:.1f} s over the {len(info)} "
            f"experts (peak memory +{peak:.0f} MiB; {cached}/{len(info)} from the cache)"
        )
    return note


# -- statistics ---------------------------------------------------------------------------
def check_heads(ev: Evaluator, pool: list[Expert]) -> None:
    """Each expert's head fits its task's label set (the head template's shapes)."""
    for e in pool:
        task = e.tasks[0]
        template = ev.base.head_templates[task].state_dict()
        head = e.heads[task]
        for name, t in template.items():
            if name not in head or tuple(head[name].shape) != tuple(t.shape):
                got = tuple(head[name].shape) if name in head else "missing"
                labels = list(ev.tasks[task].label_names)
                raise SpliceError(
                    f"the expert of {task} has a head whose '{name}' is {got}, but the "
                    f"task has {len(labels)} classes {labels} (expected {tuple(t.shape)}): "
                    "its label set differs from the task's"
                )


def sample_batches(ev: Evaluator, task: str, data: dict[str, Any], size: int | None = None):
    """Task ``task``'s seeded train sample, tokenized in batches with their labels."""
    from splice.train.data import tokenize_batch

    part = ev.tasks[task].parts["train"]
    n = len(part)
    if n == 0:
        raise SpliceError(f"task {task}: no training examples for the statistics")
    order = sample_indices(n, data)
    bs = size or data["batch_size"]
    out = []
    for s in range(0, len(order), bs):
        idx = order[s : s + bs]
        b = tokenize_batch(ev.base.tokenizer, [part.texts[i] for i in idx], ev.max_length)
        b["labels"] = torch.tensor([part.labels[i] for i in idx], dtype=torch.long)
        out.append(b)
    return out


def expert_model(ev: Evaluator, e: Expert) -> torch.nn.Module:
    """Expert ``e`` as a classifier: its backbone and its own task's head, eval mode."""
    from safetensors.torch import load_file

    from splice.bench.backbone import head_of

    task = e.tasks[0]
    model = ev.base.fresh_model(ev.tasks[task])
    model.load_state_dict(load_file(str(e.folder / "model.safetensors")), strict=False)
    head_of(model, ev.base.head_name).load_state_dict(e.heads[task])
    return model.float().eval()


def stats_path(ev: Evaluator, e: Expert, kind: str, data: dict[str, Any]) -> Path:
    return stats_file(e, ev.tasks[e.tasks[0]].identity(), kind, data, ev.max_length)


def stats_file(
    e: Expert, task: dict[str, Any], kind: str, data: dict[str, Any], max_length: int
) -> Path:
    """The cache file of expert ``e``'s ``kind`` statistics: keyed on the expert, its task's
    identity (``task``: examples and split), the statistic, the data settings that change
    it and the token length (both pools: the classifier's and the causal LM's)."""
    from splice.bench.cache import bench_root, content_key

    settings = {k: data[k] for k in ("examples", "seed")}
    if kind == "gram":
        settings["batch_size"] = data["batch_size"]  # padding rows count in the Gram
    else:
        settings["per_example"] = data.get("per_example", True)
        if not settings["per_example"]:
            settings["batch_size"] = data["batch_size"]
    key = content_key(
        {
            "expert": e.meta.get("key") or e.folder.name,
            "task": task,
            "statistic": kind,
            "settings": settings,
            "max_length": max_length,
            "version": 1,
        }
    )
    return bench_root() / "stats" / f"{kind}-{e.folder.name}-{key[:16]}.safetensors"


def sample_indices(n: int, data: dict[str, Any]) -> list[int]:
    """The seeded sample of ``data['examples']`` of a train split's ``n`` examples."""
    return random.Random(data["seed"]).sample(range(n), min(data["examples"], n))


def expert_statistics(
    ev: Evaluator, e: Expert, kind: str, data: dict[str, Any]
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Expert ``e``'s ``kind`` statistics (fisher / gram) on its task's train sample, from
    the cache or collected and cached; (statistics, metadata: seconds, peak_mb, cached)."""
    from safetensors import safe_open

    from splice.merge.data_stats import (
        collect_fisher,
        collect_gram,
        load_statistics,
        save_statistics,
    )
    from splice.train.statistics import classification_losses, forward_inputs

    path = stats_path(ev, e, kind, data)
    if path.is_file():
        with safe_open(str(path), "pt") as f:
            meta = dict(f.metadata() or {})
        return load_statistics(path), {**meta, "cached": "true"}
    task = e.tasks[0]
    head = ev.base.head_name
    with PeakRSS() as mem:
        start = time.perf_counter()
        model = expert_model(ev, e)
        if kind == "fisher":
            per_example = bool(data.get("per_example", True))
            batches = sample_batches(ev, task, data, 1 if per_example else None)
            stats = collect_fisher(model, batches, classification_losses, per_example=per_example)
            stats = {n: f for n, f in stats.items() if not n.startswith(head + ".")}
        else:
            batches = sample_batches(ev, task, data)
            stats = collect_gram(
                model, batches, forward=forward_inputs, exclude=[rf"^{head}(\.|$)"]
            )
        secs = time.perf_counter() - start
    meta = {
        "format": "splice-statistics",
        "kind": kind,
        "task": task,
        "examples": str(sum(len(b["labels"]) for b in batches)),
        "seconds": f"{secs:.2f}",
        "peak_mb": f"{mem.mb:.1f}",
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_statistics(stats, path, meta)
    return stats, {**meta, "cached": "false"}


def _inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in batch.items() if k != "labels"}


def _float(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def _key(params: dict[str, Any]) -> str:
    return repr(sorted(params.items()))


def run_fw_merge(
    model: torch.nn.Module,
    base: dict[str, torch.Tensor],
    states: list[dict[str, torch.Tensor]],
    objectives: list[Callable[..., torch.Tensor]],
    variant: str,
    params: dict[str, Any],
) -> tuple[Any, float, float]:
    """One FW-Merging row's merge (`splice.merge.frank_wolfe.fw_merge` with the row's
    settings; hard starts from task arithmetic, soft from the base): the result, its seconds
    and peak memory (MiB over the start), for the classifier and the LM pools alike."""
    from splice.merge.frank_wolfe import fw_merge

    with PeakRSS() as mem:
        start = time.perf_counter()
        res = fw_merge(
            model,
            base,
            states,
            objectives,
            variant=variant,  # type: ignore[arg-type]
            iterations=params["iterations"],
            soft_scaling=params["soft_scaling"],
            granularity=params["granularity"],
            oracle=params["oracle"],
            init="task_arithmetic" if variant == "hard" else "base",
        )
        secs = time.perf_counter() - start
    return res, secs, mem.mb
