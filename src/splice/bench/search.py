"""Coefficient-search rows of `splice bench` ("ties+search"): each chosen method's per-model
(optionally per-layer-block) weights found by CMA-ES on the validation split.

    search:
      methods: [task_arithmetic, ties]   # [] (default): no search rows
      budget: 30            # merges per (kind, method): CMA-ES objective evaluations
      patience: null        # stop after N generations without improvement (null: never)
      seed: 0               # same seed, same coefficients
      layer_groups: 0       # 0: one weight per expert; G: G layer blocks + the rest
      bounds: [0.0, 1.0]    # box of every weight
      objective: accuracy   # accuracy (mean over tasks, the sweep's criterion) | loss

A searched method starts from the bench's own recipe for it (`bench.methods`: its defaults
and ``merge.params``, λ = 1 unless set) with every expert's ``weight`` at 1 (clipped into
``bounds``); the search (`splice.engine.coefficient_search`) replaces the weights only, so
"ties+search" is TIES with density 0.2 and searched model weights. Each candidate is merged
by the real engine in memory and scored with each task's own head on the validation split:
``accuracy`` minimises −(mean validation accuracy over tasks), as the sweep selects;
``loss`` minimises the mean over tasks of the validation cross-entropy (smooth in the
weights, which CMA-ES prefers to accuracy's plateaus). Test data never informs the search.
The best candidate (the start point included, so never worse on validation than weights 1)
is evaluated on test and normalized like every other row; its row records the weights per
expert (and block), the merges used and the search's wall time, and its recipe is written
to ``searched/<kind>-<method>.yaml`` under the output folder (`splice merge` reproduces
the backbone exactly).

Checked before any expert is trained: each method exists, merges dense tensors and has
per-model weights; every task's validation split is non-empty with at least two classes.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from splice.bench.config import SearchSettings
from splice.bench.merging import make_recipe
from splice.engine.coefficient_search import search_coefficients
from splice.errors import SpliceError
from splice.merge import get_method

if TYPE_CHECKING:
    from splice.bench.evaluate import Evaluator
    from splice.bench.experts import Expert
    from splice.bench.methods import PlannedMethod
    from splice.bench.results import Row
    from splice.bench.tasks import TaskData

SUFFIX = "+search"


def plan_searches(
    settings: SearchSettings, n_models: int, params: dict[str, dict[str, Any]]
) -> list[PlannedMethod]:
    """The searched methods with the bench's settings for each; a method that cannot be
    searched is an error here, before any expert is trained."""
    from splice.bench.methods import select_methods

    if not settings.methods:
        return []
    planned, skipped = select_methods(settings.methods, n_models, params, None, sweep=False)
    if skipped:
        s = skipped[0]
        raise SpliceError(f"search.methods: {s.name} cannot run on this pool: {s.reason}")
    for p in planned:
        m = get_method(p.name)
        if m.representation != "dense":
            raise SpliceError(
                f"search.methods: {p.name} merges LoRA factors; the search runs dense methods"
            )
        searchable = [q.name for q in m.params if q.per_model and q.describe_type() == "float"]
        if "weight" not in searchable:
            raise SpliceError(
                f"search.methods: {p.name} has no per-model weights to search "
                "(e.g. task_arithmetic, ties, dare_ties, dare_linear, breadcrumbs do)"
            )
        for end in settings.bounds:
            m.param("weight").validate([end], "search.bounds")
    return planned


def check_validation_data(tasks: list[TaskData]) -> None:
    """Every task's validation split has examples of at least two classes."""
    for t in tasks:
        labels = t.parts["validation"].labels
        if not labels:
            raise SpliceError(f"search: task {t.name} has no validation examples to search on")
        if len(set(labels)) < 2:
            raise SpliceError(
                f"search: the validation split of {t.name} has one class only; "
                "accuracy on it cannot rank merges"
            )


def _validation_loss(ev: Evaluator, state: dict, heads: dict[str, dict]) -> dict[str, float]:
    """Mean cross-entropy per task of the backbone with each task's head on validation."""
    ev.load_backbone(state)
    out = {}
    for name in ev.tasks:
        enc = ev.encoded[(name, "validation")]
        head = ev.head_module(name, heads[name])
        with torch.no_grad():
            logits = torch.cat([head(f) for f in ev.features(enc)])
        loss = torch.nn.functional.cross_entropy(logits, torch.tensor(enc.labels))
        out[name] = float(loss)
    return out


def objective_value(
    ev: Evaluator, state: dict, heads: dict[str, dict], objective: str
) -> tuple[float, dict[str, float]]:
    """(the value minimised, the per-task numbers): −mean validation accuracy, or the mean
    validation cross-entropy (``objective = "loss"``)."""
    if objective == "loss":
        per_task = _validation_loss(ev, state, heads)
        return sum(per_task.values()) / len(per_task), per_task
    per_task = ev.evaluate(state, heads, "validation")
    return -sum(per_task.values()) / len(per_task), per_task


def search_row(
    kind: str,
    p: PlannedMethod,
    settings: SearchSettings,
    ev: Evaluator,
    base_folder: Path,
    pool: list[Expert],
    merge_seed: int,
    out: Path,
    evaluate_many: Any = None,
) -> Row:
    """Search one method's weights on one kind's experts; the row of the best candidate.
    ``evaluate_many``: the candidates evaluated elsewhere (Ray, `bench.ray_run`), the same
    objective."""
    from splice.bench.results import Row

    names = [e.tasks[0] for e in pool]
    heads = {e.tasks[0]: e.heads[e.tasks[0]] for e in pool}
    folders = [e.folder for e in pool]
    recipe = make_recipe(p.name, p.params, base_folder, folders, merge_seed)
    validation: dict[float, dict[str, float]] = {}

    def objective(state: dict) -> float:
        value, per_task = objective_value(ev, state, heads, settings.objective)
        validation.setdefault(value, per_task)
        return value

    found = search_coefficients(
        recipe,
        objective,
        budget=settings.budget,
        seed=settings.seed,
        bounds=settings.bounds,
        layer_groups=settings.layer_groups,
        patience=settings.patience,
        evaluate_many=evaluate_many,
    )
    assert found.state is not None
    test = ev.evaluate(found.state, heads, "test")
    target = out / "searched" / f"{kind}-{p.name}.yaml"
    target.parent.mkdir(parents=True, exist_ok=True)
    found.write(target)
    parts = found.space.parts()
    values = list(found.coefficients.values())
    weights = {
        name: {part: round(values[i * len(parts) + j], 4) for j, part in enumerate(parts)}
        for i, name in enumerate(names)
    }
    params = {
        **p.params,
        "evaluations": found.evaluations,
        "search_seconds": round(found.seconds, 1),
    }
    if found.stopped != "budget":
        params["stopped"] = found.stopped
    val = validation.get(found.value)
    if settings.objective == "loss" or val is None:  # accuracy, as other rows'; not seen here
        val = ev.evaluate(found.state, heads, "validation")
    return Row(
        kind,
        "merged",
        p.name + SUFFIX,
        test,
        params,
        "searched",
        round(found.seconds, 2),
        val,
        weights=weights,
    )


def run_searches(
    runner: Any,
    kinds: list[str],
    planned: list[PlannedMethod],
    settings: SearchSettings,
    ev: Evaluator,
    base_folder: Path,
    experts: dict[str, dict[str, Expert]],
    merge_seed: int,
    out: Path,
) -> None:
    """Every (kind, searched method) row into ``runner.rows``; a failure is recorded in
    ``runner.failed`` as a merge's is, and the run goes on."""
    from splice.bench.results import Failure

    for kind in kinds:
        pool = [experts[kind][t] for t in ev.tasks]
        for p in planned:
            runner.step(f"{kind} {p.name}{SUFFIX}")
            try:
                remote = runner.search_evaluator(kind, p.name, settings.objective)
                runner.rows.append(
                    search_row(kind, p, settings, ev, base_folder, pool, merge_seed, out, remote)
                )
            except (SpliceError, RuntimeError, ValueError) as e:
                msg = f"{type(e).__name__}: {e}"
                tqdm.write(f"splice bench: {kind} {p.name}{SUFFIX} failed, skipped: {msg}")
                runner.failed.append(Failure(kind, p.name + SUFFIX, msg))
            runner.done()
