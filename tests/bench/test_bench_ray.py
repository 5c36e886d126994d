"""`splice bench --ray` and `splice search --ray` on a local Ray instance (2 CPUs, started
once for the module): the same results as the local run, the cache shared between modes,
clean errors for Ray missing and an address that does not answer."""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import pytest
import torch
import yaml
from bench_test_util import local_ray_and_rerun, tiny_config, without_keys
from safetensors.torch import load_file, save_file

from cli_checks import fails_cleanly
from splice.bench import parse_bench_config
from splice.cli import main
from splice.errors import SpliceError
from tiny_hf import save_tiny_llama_folder

ray = pytest.importorskip("ray")

TIMING = {"merge_seconds", "inference_cost", "search_seconds", "seconds", "note"}


def _untimed(value):
    return without_keys(value, TIMING)


def _config(tiny_bert, tiny_tasks):
    """LoRA experts and the multi-task model; a method without a sweep, one with the default
    off its grid, one with it on the grid; a coefficient search; no composition rows."""
    data = tiny_config(
        tiny_bert,
        tiny_tasks,
        data={"train_per_class": 24, "validation_max": 30, "test_max": 30},
        training={"epochs": 3},
        merge={
            "methods": ["linear", "task_arithmetic", "ties"],
            "grids": {
                "task_arithmetic": {"lambda": [0.3, 0.6]},
                "ties": {"lambda": [0.6, 1.0]},
            },
        },
        compose=[],
    )
    data["search"] = {"methods": ["task_arithmetic"], "budget": 7, "seed": 3}
    data["kinds"] = ["lora"]
    data["baselines"] = {"probe": False, "multitask": True}
    return parse_bench_config(data)


@pytest.fixture(scope="module")
def runs(local_ray, tiny_bert, tiny_tasks, tmp_path_factory):
    """A local run, a Ray run on its own cache, and a Ray rerun on the local run's cache."""
    root = tmp_path_factory.mktemp("bench-ray")
    cfg = _config(tiny_bert, tiny_tasks)
    out = {n: (res, root / n) for n, res in local_ray_and_rerun(cfg, root).items()}
    out["root"] = root
    return out


def _saved(folder: Path) -> dict:
    return json.loads((folder / "results.json").read_text())


def test_ray_rows_equal_the_local_rows(runs):
    local, ray_run = _saved(runs["local"][1]), _saved(runs["ray"][1])
    assert _untimed(local["tables"]) == _untimed(ray_run["tables"])
    assert _untimed(local["sweeps"]) == _untimed(ray_run["sweeps"])
    assert local["failed"] == ray_run["failed"] == []
    a, b = runs["local"][0], runs["ray"][0]
    for task, e in a.experts["lora"].items():
        other = b.experts["lora"][task]
        assert (e.test, e.validation, e.steps) == (other.test, other.validation, other.steps)
        assert not e.cached and not other.cached  # trained by the run, on Ray in b
    assert a.multitask.test == b.multitask.test and not b.multitask.cached
    rows = [r for r in b.tables["lora"] if r.group == "merged"]
    methods = [(r.method, r.variant) for r in rows]
    assert ("task_arithmetic", "tuned") in methods and (
        "task_arithmetic+search",
        "searched",
    ) in methods
    tuned = next(r for r in rows if r.variant == "tuned")
    assert tuned.params["lambda"] in (0.3, 0.6)  # best of the grid, not the default 1.0


def test_the_search_rows_and_recipes_are_the_same(runs):
    """The searched recipe: the same weights (its expert folders are in each run's cache)."""
    name = "searched/lora-task_arithmetic.yaml"
    local = (runs["local"][1] / name).read_text()
    assert (runs["rerun"][1] / name).read_text() == local  # the same cache
    root = runs["root"]
    assert (runs["ray"][1] / name).read_text().replace(str(root / "b"), str(root / "a")) == local


def test_a_ray_rerun_after_a_local_run_trains_nothing(runs):
    again, _ = runs["rerun"]
    local, _ = runs["local"]
    experts = runs["root"] / "a" / "bench" / "experts"
    assert len(list(experts.iterdir())) == 3  # 2 LoRA experts + multi-task, no new one
    for kind, pool in again.experts.items():
        for task, e in pool.items():
            assert e.cached and e.folder == local.experts[kind][task].folder
    assert again.multitask.cached
    assert _untimed(_saved(runs["rerun"][1])["tables"]) == _untimed(
        _saved(runs["local"][1])["tables"]
    )


@pytest.fixture(scope="module")
def lm_pool(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("search-ray")
    base = save_tiny_llama_folder(root / "base")
    weights = load_file(str(base / "model.safetensors"))
    models = []
    for i in range(2):
        g = torch.Generator().manual_seed(i)
        folder = root / f"ft{i}"
        folder.mkdir()
        save_file(
            {n: t + 0.05 * torch.randn(t.shape, generator=g) for n, t in weights.items()},
            str(folder / "model.safetensors"),
        )
        shutil.copy(base / "config.json", folder / "config.json")
        models.append({"model": str(folder)})
    (root / "val.txt").write_text("the cat sat on the mat.\nabc abc abc.\nhello world!\n")
    recipe = {"method": "ties", "base_model": str(base), "models": models, "dtype": "float32"}
    (root / "ties.yaml").write_text(yaml.safe_dump(recipe))
    return {"recipe": root / "ties.yaml", "data": root / "val.txt"}


def test_search_on_ray_equals_the_local_search(local_ray, lm_pool, tmp_path, capsys):
    """Same seed, same candidates, same losses: the same best recipe and record."""
    records = []
    for extra in ([], ["--ray"]):
        best = tmp_path / f"best{len(extra)}.yaml"
        argv = ["search", str(lm_pool["recipe"]), "--data", str(lm_pool["data"])]
        argv += ["--out", str(best), "--budget", "14", "--seed", "5", "--quiet", "--json"]
        assert main([*argv, "--max-length", "16", "--layer-groups", "1", *extra]) == 0
        printed = capsys.readouterr().out
        record = json.loads(printed[printed.index("{") :])
        records.append((best.read_text(), {k: v for k, v in record.items() if k not in TIMING}))
    assert records[0][1].pop("recipe") != records[1][1].pop("recipe")
    assert records[0] == records[1]
    assert records[0][1]["evaluations"] == 14 and records[0][1]["generations"] >= 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_address_that_does_not_answer_fails_before_any_work(
    local_ray, tiny_bert, tiny_tasks, lm_pool, tmp_path, capsys
):
    address = f"127.0.0.1:{_free_port()}"
    config = tmp_path / "bench.yaml"
    config.write_text(yaml.safe_dump(tiny_config(tiny_bert, tiny_tasks)))
    out = tmp_path / "out"
    err = fails_cleanly(["bench", str(config), "--out", str(out), "--ray", address], capsys)
    assert f"--ray {address}: no Ray cluster answers" in err
    assert not out.exists()
    best = tmp_path / "best.yaml"
    argv = ["search", str(lm_pool["recipe"]), "--data", str(lm_pool["data"]), "--out", str(best)]
    err = fails_cleanly([*argv, "--ray", "ray://127.0.0.1:1"], capsys)
    assert "no Ray cluster answers at 127.0.0.1:1" in err and not best.exists()
    err = fails_cleanly([*argv, "--ray", "nonsense"], capsys)
    assert "expected HOST:PORT" in err


def test_ray_missing_is_a_one_line_error_with_the_install_hint(monkeypatch, tmp_path, capsys):
    import importlib.util

    from splice.engine.ray_pool import ray_session

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a)
    )
    hint = r"--ray needs Ray.*pip install 'splice\[ray\]'"
    with pytest.raises(SpliceError, match=hint), ray_session(None):
        pass


def test_a_units_splice_error_reaches_the_driver_as_itself(local_ray):
    """A unit's `SpliceError` is raised on the driver as that error (one line for the CLI),
    not wrapped in Ray's error with the worker's traceback."""
    from splice.engine.ray_pool import RayPool, evaluate_candidate
    from splice.errors import RecipeError

    pool = RayPool(1)
    with pytest.raises(RecipeError) as info:
        pool.map(evaluate_candidate, [(dict, "bad-recipe", {"method": "linear"})])
    assert type(info.value) is RecipeError and "'models' or 'slices'" in str(info.value)
    assert "Traceback" not in str(info.value)
