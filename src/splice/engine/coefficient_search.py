"""Coefficient search for any recipe: per-model (and per-layer-group) merge weights found by
CMA-ES on a validation objective, written back as an ordinary recipe.

    found = search_coefficients("ties.yaml", objective, budget=40, seed=0)
    found.write("best.yaml")          # `splice merge best.yaml` rebuilds found.state exactly

The search space (Akiba et al. 2025, "Evolutionary optimization of model merging recipes",
parameter-space merging; M2N2's coefficient evolution is the same loop): a recipe fixes the
method and every other parameter; c ∈ [lo, hi]^D are the values of one per-model parameter
(``weight`` by default: Task Arithmetic's, TIES', DARE's, ...). With ``layer_groups = G``
each model gets G + 1 values: one per contiguous block of transformer layers (the L layers
split as evenly as integer division allows, block b = layers ⌊bL/G⌋ … ⌊(b+1)L/G⌋ − 1) and
one for every tensor outside the layers (embeddings, final norm, head); D = models · (G + 1).
The objective f(θ(c)) is a callable on the merged state dict θ(c) (lower is better) and the
search minimises it with `splice.engine.cma_search.cma_minimize` (seeded, bounded, budget =
objective evaluations = merges, optional early stop after ``patience`` generations without
improvement). The start point is the recipe's own value of the parameter per model (else its
method default), clipped into the bounds.

Each candidate c is a recipe: the input recipe with ``models[i].parameters[P]`` replaced by
the scalar c_i, or, per layer group, by the recipe syntax for per-tensor values,
``[{filter: 're:(?:^|\\.)(?:layers|h|layer|blocks|block)\\.(?:0|1)\\.', value: c_i0}, ...,
{value: c_i,rest}]`` (the first matching filter wins; the last entry has no filter and
matches every other tensor). The grouping is checked against the engine's own layer finder
(`splice.engine.layers`) on every tensor name before the search starts. That recipe is
planned by the real engine and merged in memory (`splice.engine.in_memory`), so the best
candidate's recipe, written as YAML, is exactly what `splice merge` runs, and its output is
the searched state bit for bit (floats are written with Python's round-trip repr).

Everything cheap is checked before the first merge: the budget, the bounds against the
parameter's own range, the recipe's shape (``models:``; ``slices`` are not searched), that
the method has the per-model float parameter, the layer count for ``layer_groups``.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from splice.engine.cma_search import SearchError, cma_minimize
from splice.engine.in_memory import merge_to_memory
from splice.engine.layers import layer_index
from splice.engine.plan import plan_merge
from splice.errors import RecipeError
from splice.io.textfile import load_yaml
from splice.merge import get_method
from splice.recipe.schema import Recipe, parse_recipe
from splice.recipe.settings import evaluate_setting

State = dict[str, torch.Tensor]
LAYER_SEGMENT = r"(?:^|\.)(?:layers|h|layer|blocks|block)\."  # as splice.engine.layers


class CoefficientSearchError(SearchError):
    """A coefficient search cannot start (bad budget, recipe, method or grouping)."""


def layer_blocks(num_layers: int, groups: int) -> list[list[int]]:
    """``groups`` contiguous blocks of ``range(num_layers)``, sizes differing by at most 1."""
    return [
        list(range(b * num_layers // groups, (b + 1) * num_layers // groups)) for b in range(groups)
    ]


def block_filter(layers: list[int]) -> str:
    """The recipe filter matching the tensors of ``layers`` (a ``re:`` filter)."""
    return "re:" + LAYER_SEGMENT + "(?:" + "|".join(str(i) for i in layers) + r")\."


def recipe_yaml(recipe: Mapping[str, Any]) -> str:
    """A found recipe as YAML, in its keys' order; floats in Python's round-trip repr, so
    `splice merge` reads back exactly the weights that were found."""
    return yaml.safe_dump(dict(recipe), sort_keys=False, allow_unicode=True)


@dataclass(frozen=True)
class CoefficientSpace:
    """Which values are searched: ``parameter`` of each input model, per layer block."""

    parameter: str
    models: list[str]  # the recipe's non-base model references, in order
    blocks: list[list[int]]  # layer indices per block; [] = one value per model

    @property
    def per_model(self) -> int:
        return len(self.blocks) + 1 if self.blocks else 1

    @property
    def dims(self) -> int:
        return len(self.models) * self.per_model

    def parts(self) -> list[str]:
        """What each of a model's values covers: ``weight``, or ``layers a-b`` ... ``other``."""
        if not self.blocks:
            return ["weight"]
        return [f"layers {b[0]}-{b[-1]}" for b in self.blocks] + ["other"]

    def labels(self) -> list[str]:
        """One name per coefficient: ``model`` or ``model[layers a-b]`` / ``model[other]``."""
        if not self.blocks:
            return list(self.models)
        return [f"{m}[{p}]" for m in self.models for p in self.parts()]

    def setting(self, values: list[float]) -> Any:
        """One model's parameter setting from its ``per_model`` values."""
        if not self.blocks:
            return values[0]
        entries: list[dict[str, Any]] = [
            {"filter": block_filter(b), "value": v} for b, v in zip(self.blocks, values)
        ]
        return [*entries, {"value": values[-1]}]

    def apply(self, recipe: Mapping[str, Any], x: list[float]) -> dict[str, Any]:
        """The recipe mapping with each model's parameter set from ``x`` (a deep copy)."""
        out = copy.deepcopy(dict(recipe))
        k = self.per_model
        i = 0
        for entry in out["models"]:
            if entry["model"] not in self.models:  # the base listed among the models
                continue
            params = dict(entry.get("parameters") or {})
            params[self.parameter] = self.setting([float(v) for v in x[i * k : (i + 1) * k]])
            entry["parameters"] = params
            i += 1
        return out


@dataclass
class CoefficientSearchResult:
    """The best candidate and how the search went."""

    recipe: dict[str, Any]  # the best recipe, a plain mapping (write it with `write`)
    coefficients: dict[str, float]  # label -> value (`CoefficientSpace.labels`)
    value: float  # the objective at the best candidate
    start_value: float  # the objective at the start point (the first evaluation)
    evaluations: int  # merges made (= objective calls)
    generations: int
    stopped: str  # "budget" or "patience"
    seconds: float  # wall time of the whole search
    space: CoefficientSpace | None = None  # what was searched
    history: list[tuple[list[float], float]] = field(default_factory=list)
    state: State | None = None  # the best merged model (keep_state=True)

    def recipe_yaml(self) -> str:
        return recipe_yaml(self.recipe)

    def write(self, path: str | Path) -> Path:
        p = Path(path)
        p.write_text(self.recipe_yaml(), encoding="utf-8")
        return p


def _load(recipe: str | Path | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(recipe, Mapping):
        return copy.deepcopy(dict(recipe))
    p = Path(recipe)
    if not p.exists():
        raise RecipeError(f"recipe file {p} does not exist")
    data = load_yaml(p, RecipeError)
    if not isinstance(data, dict):
        raise RecipeError(f"{p}: a recipe is a YAML mapping")
    return data


def _start(parsed: Recipe, raw: dict[str, Any], space: CoefficientSpace, bounds: tuple) -> list:
    """Each model's own scalar value of the parameter (else the global one, else the method
    default, else the middle of the box), clipped into the bounds, repeated per block."""
    method = get_method(parsed.method_name)
    spec = method.param(space.parameter)
    default = method.default(spec, parsed.dialect)
    glob = (raw.get("parameters") or {}).get(space.parameter)
    lo, hi = bounds
    out: list[float] = []
    for entry in raw["models"]:
        if entry["model"] not in space.models:
            continue
        v = (entry.get("parameters") or {}).get(space.parameter, glob)
        v = v if isinstance(v, int | float) and not isinstance(v, bool) else default
        v = v if isinstance(v, int | float) and not isinstance(v, bool) else (lo + hi) / 2
        out += [min(max(float(v), lo), hi)] * space.per_model
    return out


def coefficient_space(
    recipe: str | Path | Mapping[str, Any],
    *,
    parameter: str = "weight",
    layer_groups: int = 0,
    bounds: tuple[float, float] = (0.0, 1.0),
) -> tuple[dict[str, Any], Recipe, CoefficientSpace]:
    """Check the recipe for a search and lay out its coefficients (nothing is merged; only
    the reference model's tensor names are read, for ``layer_groups``)."""
    raw = _load(recipe)
    parsed = parse_recipe(raw, "recipe")
    method = get_method(parsed.method_name)
    lo, hi = float(bounds[0]), float(bounds[1])
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise CoefficientSearchError(f"bounds must be finite with lower < upper (got {bounds})")
    if parsed.models is None:
        raise CoefficientSearchError(
            "coefficient search needs a recipe with `models:` (a `slices:` recipe is not searched)"
        )
    if method.representation != "dense":
        raise CoefficientSearchError(
            f"method '{method.label}' merges LoRA factors; coefficient search runs dense merges"
        )
    with_data = [i for i, e in enumerate(parsed.models) if e.data is not None]
    if with_data:  # each candidate would collect them again
        raise CoefficientSearchError(
            f"models[{with_data[0]}].data: a search merges many candidates; collect each "
            "model's statistics once with `splice stats` and give `statistics:` files"
        )
    searchable = [p.name for p in method.params if p.per_model and p.describe_type() == "float"]
    if parameter not in searchable:
        raise CoefficientSearchError(
            f"method '{method.name}' has no per-model number '{parameter}' to search; "
            f"its per-model numbers: {searchable or 'none'} "
            "(choose a method with model weights, e.g. task_arithmetic, ties, dare_ties)"
        )
    spec = method.param(parameter)
    for end in (lo, hi):
        spec.validate([end], f"bounds of '{parameter}'")
    models = [
        e.model for e in parsed.models if not (method.needs_base and e.model == parsed.base_model)
    ]
    if layer_groups < 0:
        raise CoefficientSearchError(f"layer_groups must be >= 0 (got {layer_groups})")
    blocks: list[list[int]] = []
    if layer_groups:
        blocks = _blocks(parsed, layer_groups)
    space = CoefficientSpace(parameter, models, blocks)
    if blocks:
        _check_grouping(parsed, space)
    return raw, parsed, space


def _reference_names(parsed: Recipe) -> list[str]:
    from splice.reference import open_checkpoint

    ref = parsed.base_model or parsed.models[0].model  # type: ignore[index]
    reader = open_checkpoint(ref)
    try:
        return list(reader.names())
    finally:
        reader.close()


def _blocks(parsed: Recipe, groups: int) -> list[list[int]]:
    indices = {i for i in map(layer_index, _reference_names(parsed)) if i is not None}
    if not indices:
        raise CoefficientSearchError("layer_groups: the models have no numbered layers")
    num_layers = max(indices) + 1
    if groups > num_layers:
        raise CoefficientSearchError(
            f"layer_groups = {groups} but the models have {num_layers} layers"
        )
    return layer_blocks(num_layers, groups)


def _check_grouping(parsed: Recipe, space: CoefficientSpace) -> None:
    """Every tensor name gets the block the engine's layer finder gives it."""
    probe = space.setting([float(b) for b in range(len(space.blocks) + 1)])
    setting = (
        parse_recipe(
            {"method": "linear", "models": [{"model": "x", "parameters": {"weight": probe}}]},
            "probe",
        )
        .models[0]
        .parameters["weight"]
    )  # type: ignore[index,union-attr]
    block_of = {i: b for b, layers in enumerate(space.blocks) for i in layers}
    for name in _reference_names(parsed):
        li = layer_index(name)
        expected = len(space.blocks) if li is None else block_of[li]
        if evaluate_setting(setting, name, 0.0) != expected:
            raise CoefficientSearchError(
                f"layer_groups: tensor '{name}' cannot be given its layer block by a filter"
            )


def search_coefficients(
    recipe: str | Path | Mapping[str, Any],
    objective: Callable[[State], float],
    *,
    budget: int,
    seed: int = 0,
    bounds: tuple[float, float] = (0.0, 1.0),
    parameter: str = "weight",
    layer_groups: int = 0,
    patience: int | None = None,
    sigma0: float | None = None,
    keep_state: bool = True,
    on_evaluation: Callable[[int, float, float], None] | None = None,
    evaluate_many: Callable[[list[dict[str, Any]]], list[float]] | None = None,
) -> CoefficientSearchResult:
    """Minimise ``objective(merged state)`` over the recipe's ``parameter`` values (see the
    module docstring). ``budget`` counts merges; the first candidate is the start point, so
    the answer is never worse than the recipe's own values (clipped into the bounds).

    ``evaluate_many`` (e.g. `splice.engine.ray_pool.candidate_evaluator`): merges and scores
    one generation's candidate recipes elsewhere (``objective`` is then not called here);
    it must give the values ``objective`` would, in order. The best state (``keep_state``)
    is then merged here once, from the best recipe: the same tensors, as merging is
    deterministic."""
    if budget < 1:
        raise CoefficientSearchError(f"budget must be at least 1 merge (got {budget})")
    if patience is not None and patience < 1:
        raise CoefficientSearchError(f"patience must be at least 1 generation (got {patience})")
    raw, parsed, space = coefficient_space(
        recipe, parameter=parameter, layer_groups=layer_groups, bounds=bounds
    )
    x0 = _start(parsed, raw, space, (float(bounds[0]), float(bounds[1])))
    start = time.perf_counter()
    readers: dict[str, Any] = {}
    rules_cache: dict[Any, Any] = {}  # whole-model trim thresholds: independent of weights
    best: dict[str, Any] = {"value": math.inf, "state": None}

    def evaluate(x: list[float]) -> float:
        candidate = parse_recipe(space.apply(raw, x), "candidate recipe")
        plan = plan_merge(candidate, readers)
        readers.update(plan.readers)  # opened once, shared by every candidate
        state = merge_to_memory(plan, rules_cache)
        value = float(objective(state))
        if keep_state and math.isfinite(value) and value < best["value"]:
            best["value"], best["state"] = value, state
        return value

    def evaluate_all(xs: list[list[float]]) -> list[float]:
        assert evaluate_many is not None
        return [float(v) for v in evaluate_many([space.apply(raw, x) for x in xs])]

    try:
        found = cma_minimize(
            evaluate,
            space.dims,
            budget=budget,
            seed=seed,
            bounds=(float(bounds[0]), float(bounds[1])),
            x0=x0,
            sigma0=sigma0,
            on_evaluation=on_evaluation,
            patience=patience,
            include_x0=True,
            objective_many=None if evaluate_many is None else evaluate_all,
        )
        if evaluate_many is not None and keep_state:
            plan = plan_merge(parse_recipe(space.apply(raw, found.best_x), "best recipe"), readers)
            readers.update(plan.readers)
            best["state"] = merge_to_memory(plan, rules_cache)
    finally:
        for r in readers.values():
            r.close()
    return CoefficientSearchResult(
        recipe=space.apply(raw, found.best_x),
        coefficients=dict(zip(space.labels(), found.best_x)),
        value=found.best_value,
        start_value=found.evaluations[0][1],
        evaluations=len(found.evaluations),
        generations=found.generations,
        stopped=found.stopped,
        seconds=time.perf_counter() - start,
        space=space,
        history=found.evaluations,
        state=best["state"],
    )
