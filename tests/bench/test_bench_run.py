"""The run's bookkeeping without models: a failing method is recorded, not fatal."""

from __future__ import annotations

from pathlib import Path

import pytest
from tqdm import tqdm

import splice.bench.run as run_mod
from splice.bench.config import parse_bench_config
from splice.bench.experts import Expert
from splice.bench.methods import PlannedMethod
from splice.bench.results import Failure
from splice.errors import SpliceError


class _Eval:
    """Accuracy = the merge's lambda / 2 on every task (so the sweep has a clear best)."""

    def evaluate(self, state, heads, split, tasks=None):
        return {"a": state["lambda"] / 2, "b": state["lambda"] / 2}


def _runner():
    r = run_mod._Runner(parse_bench_config({"tasks": ["a.csv", "b.csv"]}), progress=False)
    r.bar = tqdm(total=100, disable=True)
    return r


POOL = [Expert("full", [t], Path(t), {t: {}}) for t in ("a", "b")]


def test_sweep_rows_and_units(monkeypatch):
    monkeypatch.setattr(run_mod, "merge_backbones", lambda m, params, *a, **k: (params, 0.1))
    r = _runner()
    p = PlannedMethod("task_arithmetic", {}, ("lambda", [0.5, 1.2, 0.8]), False)
    r.merge_method("full", p, _Eval(), Path("base"), POOL)
    assert r.units == 5 and not r.failed
    default, tuned = r.rows
    assert default.params == {"lambda": 1.0} and default.test == {"a": 0.5, "b": 0.5}
    assert tuned.params == {"lambda": 1.2} and tuned.test == {"a": 0.6, "b": 0.6}
    (sweep,) = r.sweeps
    assert sweep.best == 1.2 and not sweep.at_grid_edge
    assert [x.value for x in sweep.points] == [0.5, 1.2, 0.8]


@pytest.mark.parametrize("fail_at", [1, 2, 4])
def test_a_failing_method_is_recorded(monkeypatch, fail_at):
    calls = []

    def merge(method, params, *a, **k):
        calls.append(params)
        if len(calls) == fail_at:
            raise SpliceError("the weighted mean direction is zero")
        return params, 0.1

    monkeypatch.setattr(run_mod, "merge_backbones", merge)
    r = _runner()
    p = PlannedMethod("task_arithmetic", {}, ("lambda", [0.3, 0.5, 0.7]), False)
    r.merge_method("lora", p, _Eval(), Path("base"), POOL)
    assert r.rows == [] and r.sweeps == []  # nothing partial
    assert r.failed == [
        Failure("lora", "task_arithmetic", "SpliceError: the weighted mean direction is zero")
    ]
    assert r.units == 5  # the bar still advances by the method's share
