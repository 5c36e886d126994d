"""`splice bench --ray`'s bookkeeping without Ray or models: the merge units of a method and
the rows assembled from their results equal what the local run makes from the same merges;
a failing unit is recorded as the local run records a failing merge."""

from __future__ import annotations

from pathlib import Path

import pytest
from bench_test_util import FakePool
from tqdm import tqdm

import splice.bench.run as run_mod
from splice.bench.config import parse_bench_config
from splice.bench.experts import Expert
from splice.bench.methods import PlannedMethod
from splice.bench.ray_run import RayRunner, assemble, merge_units
from splice.bench.results import Failure
from splice.errors import SpliceError

ACC = {0.3: 0.7, 0.5: 0.8, 0.7: 0.5, 0.8: 0.8, 1.0: 0.75, 1.2: 0.6}  # a tie at 0.5 / 0.8


class _Eval:
    """Accuracy per task by the merge's lambda (test a little lower than validation)."""

    tasks = ("a", "b")  # the names, in order, as Evaluator.tasks iterates

    def evaluate(self, state, heads, split, tasks=None):
        acc = ACC[state.get("lambda", 1.0)] - (0.05 if split == "test" else 0)
        return {"a": acc, "b": acc - 0.1}


def _cfg():
    return parse_bench_config({"tasks": ["a.csv", "b.csv"], "kinds": ["full"]})


POOL = [Expert("full", [t], Path(t), {t: {}}) for t in ("a", "b")]


def _local(monkeypatch, p):
    monkeypatch.setattr(run_mod, "merge_backbones", lambda m, params, *a, **k: (params, 0.25))
    r = run_mod._Runner(_cfg(), progress=False)
    r.bar = tqdm(total=100, disable=True)
    r.merge_method("full", p, _Eval(), Path("base"), POOL)
    return r


def _unit_result(params, splits):
    return {"seconds": 0.25, **{s: _Eval().evaluate(params, None, s) for s in splits}}


@pytest.mark.parametrize(
    "p",
    [
        PlannedMethod("linear", {}, None, False),
        PlannedMethod("task_arithmetic", {}, ("lambda", [0.3, 0.5, 1.0]), False),  # default best
        PlannedMethod("task_arithmetic", {}, ("lambda", [0.5, 1.0, 0.8]), False),  # tie: 0.5
        PlannedMethod("task_arithmetic", {}, ("lambda", [0.3, 0.8]), False),  # default off grid
        PlannedMethod("ties", {"density": 0.3}, ("lambda", [1.2, 1.0]), False),  # best = default
    ],
)
def test_assembled_rows_equal_the_local_rows(monkeypatch, p):
    local = _local(monkeypatch, p)
    units = merge_units(p)
    grid = p.sweep[1] if p.sweep else []
    assert len(units) == len(grid) + (1 if p.sweep is None or 1.0 not in grid else 0)
    results = [_unit_result(params, splits) for _, params, splits in units]
    rows, sweep = assemble("full", p, units, results)
    assert rows == local.rows
    assert ([sweep] if sweep else []) == local.sweeps


@pytest.mark.parametrize("fail", [0.3, 0.5, 1.0])
def test_a_failing_unit_is_recorded_as_locally(monkeypatch, fail):
    grid = [0.3, 0.5, 0.7 if fail == 1.0 else 1.0]  # 1.0: the default's own merge fails
    p = PlannedMethod("task_arithmetic", {}, ("lambda", grid), False)
    r = RayRunner.__new__(RayRunner)  # no Ray: the units run in the fake pool
    run_mod._Runner.__init__(r, _cfg(), progress=False)
    r.bar = tqdm(total=100, disable=True)
    r.pool, r.spec = FakePool(fail, _unit_result), {}
    r.merge_all([p], _Eval(), Path("base"), {"full": dict(zip("ab", POOL))})
    assert r.rows == [] and r.sweeps == []
    msg = "SpliceError: the weighted mean direction is zero"
    assert r.failed == [Failure("full", "task_arithmetic", msg)]
    assert r.units == 5  # the method's share of the bar, as locally

    def merge(method, params, *a, **k):
        if params.get("lambda") == fail:
            raise SpliceError("the weighted mean direction is zero")
        return params, 0.25

    monkeypatch.setattr(run_mod, "merge_backbones", merge)
    local = run_mod._Runner(_cfg(), progress=False)
    local.bar = tqdm(total=100, disable=True)
    local.merge_method("full", p, _Eval(), Path("base"), POOL)
    assert local.failed == r.failed and local.units == r.units
