"""`splice bench --ray` on the tiny Llama's causal-LM pool (`bench.lm_ray_run`), on a local
Ray instance of 2 CPUs: the rows equal the local run's (the same experts, multi-task model,
scores, parameters and variants), and a Ray rerun on the local run's cache trains nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from bench_test_util import local_ray_and_rerun, tiny_lm_config, without_keys

from splice.bench import parse_bench_config

pytest.importorskip("ray")

TIMING = {"merge_seconds", "seconds", "train_seconds"}


def _untimed(value):
    return without_keys(value, TIMING)


@pytest.fixture(scope="module")
def runs(local_ray, tiny_lm_pool, tmp_path_factory):
    """A local run, a Ray run on its own cache, a Ray rerun on the local run's cache. The
    task-arithmetic grid lacks the default λ = 0 (its own unit) and a point beats it; the
    multi-task model trains as a unit too."""
    model, tasks = tiny_lm_pool
    grids = {"task_arithmetic": {"lambda": [0.5, 1.0]}}
    cfg = tiny_lm_config(model, tasks, baselines={"probe": False, "multitask": True})
    cfg = parse_bench_config({**cfg, "merge": {**cfg["merge"], "grids": grids}})
    root = tmp_path_factory.mktemp("bench-lm-ray")
    return {"root": root, **local_ray_and_rerun(cfg, root)}


def _saved(root: Path, name: str) -> dict:
    return json.loads((root / name / "results.json").read_text())


def test_lm_ray_rows_equal_the_local_rows(runs):
    root = runs["root"]
    local, ray_run = _saved(root, "local"), _saved(root, "ray")
    assert local["failed"] == ray_run["failed"] == []
    assert _untimed(local["rows"]) == _untimed(ray_run["rows"])
    assert _untimed(local["pretrained"]) == _untimed(ray_run["pretrained"])
    mt, ray_mt = local["experts"].pop("multitask"), ray_run["experts"].pop("multitask")
    assert (mt["test"], mt["steps"]) == (ray_mt["test"], ray_mt["steps"])
    assert not mt["cached"] and not ray_mt["cached"]
    assert ("full", "multi-task", None) in {
        (r["kind"], r["method"], r["variant"]) for r in local["rows"]
    }
    for kind, pool in local["experts"].items():
        for task, e in pool.items():
            other = ray_run["experts"][kind][task]
            assert (e["test"], e["validation"], e["steps"]) == (
                other["test"],
                other["validation"],
                other["steps"],
            )
            assert not e["cached"] and not other["cached"]  # trained by the run, on Ray in b
    rows = {(r.kind, r.method, r.variant): r for r in runs["ray"].rows}
    assert rows[("full", "task_arithmetic", "default")].params == {"lambda": 0.0}
    assert rows[("full", "task_arithmetic", "tuned")].params["lambda"] in (0.5, 1.0)
    assert ("lora", "lora:svd", "default") in rows and ("full", "lora:svd", "default") not in rows


def test_a_lm_ray_rerun_after_a_local_run_trains_nothing(runs):
    root = runs["root"]
    experts = root / "a" / "bench" / "lm-experts"
    assert len(list(experts.iterdir())) == 7  # 2 kinds x 3 tasks + multi-task, no new one
    mt = runs["rerun"].multitask
    assert mt["cached"] and mt["folder"] == runs["local"].multitask["folder"]
    for kind, pool in runs["rerun"].experts.items():
        for task, e in pool.items():
            assert e["cached"] and e["folder"] == runs["local"].experts[kind][task]["folder"]
    assert _untimed(_saved(root, "rerun")["rows"]) == _untimed(_saved(root, "local")["rows"])
