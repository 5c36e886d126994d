"""Coefficient search (`splice.engine.coefficient_search`): known optima on constructed
problems, determinism, the budget, early stopping, the written recipe, errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from splice.cli import main
from splice.engine.coefficient_search import (
    CoefficientSearchError,
    block_filter,
    layer_blocks,
    search_coefficients,
)
from splice.engine.layers import layer_index

Models = dict[str, object]


def _recipe(models: Models, method: str = "task_arithmetic", n: int = 3, **params) -> dict:
    return {
        "method": method,
        "base_model": models["base"],
        "models": [{"model": models[f"ft{i}"]} for i in range(n)],
        "parameters": dict(params),
        "dtype": "float32",
    }


def _target(models: Models, weights_of) -> dict[str, torch.Tensor]:
    """base + Σ_i w_i(tensor) τ_i: the task-arithmetic merge at known weights."""
    t = models["tensors"]
    base = t["base"]  # type: ignore[index]
    out = {}
    for name, b in base.items():
        out[name] = b + sum(
            w * (t[f"ft{i}"][name] - b)  # type: ignore[index]
            for i, w in enumerate(weights_of(name))
        )
    return out


def _distance(target: dict[str, torch.Tensor]):
    """‖θ − target‖²: a quadratic in the weights whose minimum is the target's weights."""
    return lambda state: float(sum(((state[n] - v) ** 2).sum() for n, v in target.items()))


def test_finds_the_known_optimum_per_model(models: Models):
    best = [0.3, 0.8, 0.55]
    target = _target(models, lambda _: best)
    found = search_coefficients(_recipe(models), _distance(target), budget=120, seed=0)
    assert found.evaluations == 120
    got = list(found.coefficients.values())
    assert got == pytest.approx(best, abs=0.02)
    assert found.value < 1e-3 * found.start_value  # the start (weights 1) is far off
    assert found.value == min(v for _, v in found.history)


def test_finds_the_known_optimum_per_layer_block(models: Models):
    # 3 layers in 2 blocks: layer 0 | layers 1-2, plus the tensors outside the layers
    blocks = {0: [0.2, 0.9], 1: [0.7, 0.4], 2: [0.7, 0.4], None: [0.5, 0.1]}
    target = _target(models, lambda name: blocks[layer_index(name)])
    found = search_coefficients(
        _recipe(models, n=2), _distance(target), budget=400, seed=0, layer_groups=2
    )
    ft0, ft1 = models["ft0"], models["ft1"]
    want = {
        f"{ft0}[layers 0-0]": 0.2,
        f"{ft0}[layers 1-2]": 0.7,
        f"{ft0}[other]": 0.5,
        f"{ft1}[layers 0-0]": 0.9,
        f"{ft1}[layers 1-2]": 0.4,
        f"{ft1}[other]": 0.1,
    }
    assert found.coefficients == pytest.approx(want, abs=0.03)
    # written in the recipe's per-tensor syntax: filters, the last entry without one
    setting = found.recipe["models"][0]["parameters"]["weight"]
    assert [e.get("filter") for e in setting] == [block_filter([0]), block_filter([1, 2]), None]


def test_layer_blocks_are_contiguous_and_even():
    assert layer_blocks(3, 2) == [[0], [1, 2]]
    assert layer_blocks(12, 3) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    assert layer_blocks(5, 5) == [[0], [1], [2], [3], [4]]


def test_same_seed_same_coefficients_other_seed_other_path(models: Models):
    objective = _distance(_target(models, lambda _: [0.3, 0.6, 0.2]))
    a = search_coefficients(_recipe(models), objective, budget=15, seed=4)
    b = search_coefficients(_recipe(models), objective, budget=15, seed=4)
    c = search_coefficients(_recipe(models), objective, budget=15, seed=5)
    assert a.history == b.history and a.coefficients == b.coefficients and a.recipe == b.recipe
    assert a.history != c.history
    assert a.history[0] == c.history[0]  # both start at the recipe's own weights (1.0)
    assert a.history[0][0] == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("budget", [1, 2, 8, 13])
def test_the_budget_is_the_number_of_merges(models: Models, budget: int):
    calls = []

    def objective(state):
        calls.append(1)
        return float(state["lm_head.weight"].sum())

    found = search_coefficients(_recipe(models), objective, budget=budget, seed=0)
    assert len(calls) == found.evaluations == len(found.history) == budget
    assert found.stopped == "budget"


def test_early_stop_after_patience_generations_without_improvement(models: Models):
    calls = []

    def flat(state):
        calls.append(1)
        return 1.0  # nothing ever improves on the start point

    found = search_coefficients(_recipe(models), flat, budget=100, seed=0, patience=2)
    # the start point, then 2 generations of λ = 4 + ⌊3 ln 3⌋ = 7 candidates
    assert found.stopped == "patience"
    assert len(calls) == found.evaluations == 1 + 2 * 7
    assert found.generations == 2
    assert found.coefficients == dict.fromkeys([models["ft0"], models["ft1"], models["ft2"]], 1.0)


@pytest.mark.parametrize(
    ("method", "params", "groups"),
    [
        ("ties", {"density": 0.5}, 0),
        ("dare_ties", {"density": 0.6}, 0),  # random drops: seeded per tensor
        ("task_arithmetic", {"lambda": 0.8}, 2),
    ],
)
def test_written_recipe_merges_to_the_best_state_bit_for_bit(
    models: Models, tmp_path: Path, method, params, groups
):
    target = _target(models, lambda _: [0.4, 0.4, 0.4])
    recipe = _recipe(models, method, **params)
    found = search_coefficients(
        recipe, _distance(target), budget=10, seed=1, layer_groups=groups, bounds=(0.0, 1.5)
    )
    path = found.write(tmp_path / "best.yaml")
    data = yaml.safe_load(path.read_text())
    assert data["parameters"] == params and data["method"] == method
    assert main(["merge", str(path), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    merged = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert found.state is not None and merged.keys() == found.state.keys()
    for name, tensor in found.state.items():
        assert torch.equal(merged[name], tensor), name
    # and the written recipe scores the best value
    assert _distance(target)(merged) == found.value


def test_start_point_is_the_recipes_own_weights_clipped(models: Models):
    recipe = _recipe(models)
    recipe["models"][0]["parameters"] = {"weight": 0.25}
    recipe["models"][1]["parameters"] = {"weight": 3.0}  # outside the box: clipped
    found = search_coefficients(recipe, lambda s: 0.0, budget=1, bounds=(0.0, 1.0))
    assert found.history[0][0] == [0.25, 1.0, 1.0]


def _never(state):
    raise AssertionError("no merge may happen before the checks")


@pytest.mark.parametrize(
    ("change", "kw", "message"),
    [
        ({}, {"budget": 0}, "budget must be at least 1"),
        ({"method": "magmax"}, {}, "no per-model number 'weight'"),
        ({"method": "iso_c"}, {}, "no per-model number 'weight'"),
        ({}, {"parameter": "density"}, "no per-model number 'density'"),
        ({}, {"layer_groups": 4}, "layer_groups = 4 but the models have 3 layers"),
        ({}, {"bounds": (1.0, 1.0)}, "lower < upper"),
        ({}, {"patience": 0}, "patience must be at least 1"),
    ],
)
def test_errors_before_any_merge(models: Models, change, kw, message):
    recipe = {**_recipe(models), **change}
    with pytest.raises(CoefficientSearchError, match=message):
        search_coefficients(recipe, _never, **{"budget": 5, **kw})


def test_data_entries_are_refused(models: Models):
    entries = [{"model": models[n], "data": "texts.jsonl"} for n in ("ft0", "ft1")]
    with pytest.raises(CoefficientSearchError, match=r"models\[0\]\.data: .*splice stats"):
        search_coefficients({"method": "fisher", "models": entries}, _never, budget=5)


def test_a_slices_recipe_is_refused(models: Models):
    recipe = {
        "method": "linear",
        "slices": [{"sources": [{"model": models["ft0"], "layer_range": [0, 3]}]}],
    }
    with pytest.raises(CoefficientSearchError, match="slices"):
        search_coefficients(recipe, _never, budget=5)


def test_a_recipe_file_is_read(models: Models, tmp_path: Path):
    path = tmp_path / "ta.yaml"
    path.write_text(yaml.safe_dump(_recipe(models)))
    found = search_coefficients(path, lambda s: 0.0, budget=2)
    assert found.recipe["method"] == "task_arithmetic"
