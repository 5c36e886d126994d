"""The bench's coefficient-search rows (`splice.bench.search`) on tiny on-disk experts with a
stand-in evaluator whose validation accuracy peaks at known weights; config and errors."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from tqdm import tqdm

import splice.bench.run as run_mod
from splice.bench.config import BenchConfigError, parse_bench_config
from splice.bench.experts import Expert
from splice.bench.search import check_validation_data, plan_searches, run_searches
from splice.cli import main
from splice.errors import SpliceError

MIN = {"tasks": ["a.csv", "b.csv"]}
TARGET = {"a": 0.3, "b": 0.7}  # the weights at which the stand-in's accuracy peaks


def _folder(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    path.mkdir()
    save_file(tensors, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({"model_type": "bert", "num_hidden_layers": 2}))
    return path


@pytest.fixture
def pool(tmp_path: Path):
    """Base zeros; expert i's task vector is the unit vector e_i in every tensor, so the
    task-arithmetic merge holds each expert's weight at its own index."""
    names = ["encoder.layer.0.w", "encoder.layer.1.w", "pooler.w"]
    base = _folder(tmp_path / "base", {n: torch.zeros(2) for n in names})
    experts = []
    for i, task in enumerate(TARGET):
        e = torch.zeros(2)
        e[i] = 1.0
        folder = _folder(tmp_path / task, {n: e.clone() for n in names})
        experts.append(Expert("full", [task], folder, {task: {}}))
    return base, {"full": {e.tasks[0]: e for e in experts}}


class _Eval:
    """Accuracy of task t = 1 − (w_t − target_t)² read off the merged layer-0 tensor (test:
    the same minus 0.1), so the best validation weights are known."""

    tasks = dict.fromkeys(TARGET)

    def evaluate(self, state, heads, split, tasks=None):
        w = state["encoder.layer.0.w"]
        drop = 0.1 if split == "test" else 0.0
        return {t: 1 - (float(w[i]) - TARGET[t]) ** 2 - drop for i, t in enumerate(TARGET)}


def _runner(cfg):
    r = run_mod._Runner(cfg, progress=False)
    r.bar = tqdm(total=100, disable=True)
    return r


def test_search_rows_find_the_best_weights_and_write_a_recipe(pool, tmp_path: Path):
    base, experts = pool
    cfg = parse_bench_config(
        {**MIN, "search": {"methods": ["task_arithmetic"], "budget": 80, "seed": 0}}
    )
    planned = plan_searches(cfg.search, 2, cfg.merge.params)
    r = _runner(cfg)
    out = tmp_path / "out"
    run_searches(r, ["full"], planned, cfg.search, _Eval(), base, experts, 0, out)
    assert not r.failed and r.units == 1
    (row,) = r.rows
    assert row.method == "task_arithmetic+search" and row.variant == "searched"
    assert row.params["evaluations"] == 80 and row.params["search_seconds"] >= 0
    got = {t: w["weight"] for t, w in row.weights.items()}
    assert got == pytest.approx(TARGET, abs=0.03)
    assert row.test == pytest.approx({t: 0.9 for t in TARGET}, abs=0.02)
    assert row.validation == pytest.approx({t: 1.0 for t in TARGET}, abs=0.02)
    recipe = out / "searched" / "full-task_arithmetic.yaml"
    assert [m["parameters"]["weight"] for m in yaml.safe_load(recipe.read_text())["models"]] == [
        pytest.approx(got["a"], abs=1e-4),
        pytest.approx(got["b"], abs=1e-4),
    ]
    assert main(["merge", str(recipe), "--out", str(tmp_path / "m"), "--quiet"]) == 0
    merged = load_file(str(tmp_path / "m" / "model.safetensors"))
    assert _Eval().evaluate(merged, {}, "validation") == row.validation


def test_layer_group_search_names_the_blocks(pool, tmp_path: Path):
    base, experts = pool
    cfg = parse_bench_config(
        {**MIN, "search": {"methods": ["dare_linear"], "budget": 5, "layer_groups": 2}}
    )
    planned = plan_searches(cfg.search, 2, cfg.merge.params)
    assert planned[0].params == {"density": 0.5}  # the bench's DARE setting, as its rows
    r = _runner(cfg)
    run_searches(r, ["full"], planned, cfg.search, _Eval(), base, experts, 0, tmp_path)
    (row,) = r.rows
    assert list(row.weights["a"]) == ["layers 0-0", "layers 1-1", "other"]
    assert row.params["evaluations"] == 5 and row.params["density"] == 0.5


def test_config_defaults_and_bad_values():
    s = parse_bench_config(MIN).search
    assert s.methods == [] and s.budget == 30 and s.bounds == (0.0, 1.0)
    for bad in (
        {"budget": 0},
        {"bounds": [1.0, 0.5]},
        {"patience": 0},
        {"objective": "f1"},
        {"methods": ["ties", "ties"]},
        {"budge": 3},
    ):
        with pytest.raises(BenchConfigError, match="search"):
            parse_bench_config({**MIN, "search": bad})


@pytest.mark.parametrize(
    ("methods", "message"),
    [
        (["magmax"], "no per-model weights"),
        (["iso_c"], "no per-model weights"),
        (["lora:svd"], "LoRA factors"),
        (["slerp"], "cannot run on this pool"),
        (["tiez"], "tiez"),
    ],
)
def test_unsearchable_methods_are_errors_before_training(methods, message):
    cfg = parse_bench_config({**MIN, "search": {"methods": methods}})
    with pytest.raises(SpliceError, match=message):
        plan_searches(cfg.search, 2, cfg.merge.params)


def _task(name, labels):
    return SimpleNamespace(name=name, parts={"validation": SimpleNamespace(labels=labels)})


@pytest.mark.parametrize(
    ("labels", "message"), [([], "no validation examples"), ([1, 1, 1], "one class")]
)
def test_validation_split_errors(labels, message):
    with pytest.raises(SpliceError, match=message):
        check_validation_data([_task("a", [0, 1]), _task("b", labels)])
    check_validation_data([_task("a", [0, 1, 0])])  # fine
