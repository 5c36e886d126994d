"""`splice bench --ray` on a causal-LM pool without Ray or models: the rows assembled from the
merge units' metrics (`bench.lm_ray_run.lm_assemble`) equal the local run's rows from the
same merges (`bench.lm_run._method_rows`), and a failing unit is recorded as locally."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
from bench_test_util import FakePool

import splice.bench.merging as merging
from splice.bench.config import parse_bench_config
from splice.bench.experts import Expert
from splice.bench.lm_ray_run import LMRayRunner, lm_assemble
from splice.bench.lm_run import LMRunner, _method_rows, make_row
from splice.bench.methods import PlannedMethod
from splice.bench.ray_run import merge_units
from splice.errors import SpliceError

# the merged model's validation loss on "a" and exact match on "c", by lambda
LOSS = {0.3: 2.0, 0.5: 1.8, 0.8: 1.8, 1.0: 1.9, 1.2: 2.3}  # a tie at 0.5 / 0.8
EM = {0.3: 0.2, 0.5: 0.4, 0.8: 0.4, 1.0: 0.3, 1.2: 0.1}
PRE = {"val": {"a": {"loss": 2.5}, "c": {"exact_match": 0.0}}}
PRE["test"] = {"a": {"loss": 2.6}, "c": {"exact_match": 0.0}}
EX_VAL = {"a": {"loss": 1.5}, "c": {"exact_match": 0.5}}
EX_TEST = {"a": {"loss": 1.6}, "c": {"exact_match": 0.5}}


class _LMEval:
    """Metrics by the loaded merge's lambda (the fake merge's state is its parameters);
    test a little worse than validation."""

    def __init__(self):
        self.state = None

    def evaluate(self, state, split, tasks=None):
        if state is not None:
            self.state = state
        lam = self.state.get("lambda", 1.0)
        worse = 0.1 if split == "test" else 0.0
        return {"a": {"loss": LOSS[lam] + worse}, "c": {"exact_match": EM[lam] - worse / 2}}


def _row(ex_test=EX_TEST):
    return partial(make_row, "full", ex_test, PRE["test"])


def _local(monkeypatch, p, ex_val=EX_VAL):
    monkeypatch.setattr(merging, "merge_backbones", lambda m, params, *a, **k: (params, 0.254))
    cfg = parse_bench_config({"tasks": ["a.txt", "c.jsonl"], "kinds": ["full"]})
    return _method_rows(p, "full", cfg, _LMEval(), Path("base"), [], _row(), ex_val, PRE["val"])


def _unit_result(params, splits):
    ev = _LMEval()
    return {"seconds": 0.254, **{s: ev.evaluate(params, s) for s in splits}}


SWEEPS = [
    PlannedMethod("linear", {}, None, False),
    PlannedMethod("task_arithmetic", {}, ("lambda", [0.3, 0.5, 1.0]), False),  # best 0.5
    PlannedMethod("task_arithmetic", {}, ("lambda", [1.0, 0.8, 0.5]), False),  # tie: 0.8
    PlannedMethod("task_arithmetic", {}, ("lambda", [0.3, 1.2]), False),  # default off grid
    PlannedMethod("ties", {"density": 0.3}, ("lambda", [1.2, 1.0]), False),  # best = default
]


@pytest.mark.parametrize("p", SWEEPS)
def test_assembled_lm_rows_equal_the_local_rows(monkeypatch, p):
    local = _local(monkeypatch, p)
    units = merge_units(p)
    results = [_unit_result(params, splits) for _, params, splits in units]
    rows = lm_assemble(p, units, results, _row(), EX_VAL, PRE["val"])
    assert rows == local
    assert [r.variant for r in rows] == (["default"] if p.sweep is None else ["default", "tuned"])
    assert all(r.merge_seconds == 0.25 for r in rows)


def test_the_tuned_row_by_hand():
    """λ = 0.5: a's validation gain share (2.5 − 1.8) / (2.5 − 1.5) = 0.7, c's exact match
    0.4 / 0.5 = 0.8: mean 0.75, above λ = 0.3's (0.5 + 0.4) / 2 and λ = 1.0's (0.6 + 0.6) / 2;
    the tuned row's test scores are λ = 0.5's test metrics."""
    p = SWEEPS[1]
    units = merge_units(p)
    rows = lm_assemble(
        p, units, [_unit_result(u[1], u[2]) for u in units], _row(), EX_VAL, PRE["val"]
    )
    default, tuned = rows
    assert tuned.params == {"lambda": 0.5} and tuned.validation_score == pytest.approx(0.75)
    assert default.params == {"lambda": 1.0} and default.validation_score == pytest.approx(0.6)
    assert tuned.test == {
        "a": {"loss": pytest.approx(1.9)},
        "c": {"exact_match": pytest.approx(0.35)},
    }
    assert tuned.normalized["a"] == pytest.approx((2.6 - 1.9) / (2.6 - 1.6))


def test_no_tuned_row_when_no_point_has_a_validation_score(monkeypatch):
    """Experts that beat the pretrained model on nothing: every normalized score undefined,
    so only the default row, locally and assembled."""
    p = SWEEPS[1]
    useless = {"a": {"loss": 3.0}, "c": {"exact_match": 0.0}}
    local = _local(monkeypatch, p, ex_val=useless)
    units = merge_units(p)
    results = [_unit_result(params, splits) for _, params, splits in units]
    rows = lm_assemble(p, units, results, _row(), useless, PRE["val"])
    assert rows == local and [r.variant for r in rows] == ["default"]


@pytest.mark.parametrize("fail", [0.3, 0.5, 1.0])
def test_a_failing_lm_unit_is_recorded_as_locally(monkeypatch, fail):
    grid = [0.3, 0.5, 0.8 if fail == 1.0 else 1.0]  # 1.0: the default's own merge fails
    p = PlannedMethod("task_arithmetic", {}, ("lambda", grid), False)
    cfg = parse_bench_config({"tasks": ["a.txt", "c.jsonl"], "kinds": ["full"]})
    experts = {"full": {t: Expert("full", [t], Path(t), {}) for t in ("a", "c")}}
    r = LMRayRunner.__new__(LMRayRunner)  # no Ray: the units run in the fake pool
    LMRunner.__init__(r, cfg, _LMEval(), Path("base"), lambda s: None, False)
    r.pool, r.spec, r.jobs, r.experts = FakePool(fail, _unit_result), {}, {}, experts
    r.start_merges([p])
    got = r.method_rows(p, "full", _row(), EX_VAL, PRE["val"])
    assert got == "SpliceError: the weighted mean direction is zero" and r.jobs == {}

    def merge(method, params, *a, **k):
        if params.get("lambda") == fail:
            raise SpliceError("the weighted mean direction is zero")
        return params, 0.25

    monkeypatch.setattr(merging, "merge_backbones", merge)
    local = LMRunner(cfg, _LMEval(), Path("base"), lambda s: None, False)
    local.experts = experts
    assert local.method_rows(p, "full", _row(), EX_VAL, PRE["val"]) == got


def test_statistic_rows_run_on_the_driver(monkeypatch):
    """A data-aware method (fisher) submits no Ray unit: its rows are the local runner's."""
    p = PlannedMethod("fisher", {}, None, False, statistics={"examples": 8, "seed": 0})
    cfg = parse_bench_config({"tasks": ["a.txt", "c.jsonl"], "kinds": ["full"]})
    r = LMRayRunner.__new__(LMRayRunner)
    LMRunner.__init__(r, cfg, _LMEval(), Path("base"), lambda s: None, False)
    r.pool, r.spec, r.jobs = FakePool(None, _unit_result), {}, {}
    r.experts = {"full": {t: Expert("full", [t], Path(t), {}) for t in ("a", "c")}}
    r.start_merges([p])
    assert r.jobs == {}
    monkeypatch.setattr(LMRunner, "_stat_rows", lambda self, p, kind, *a: [(p.name, kind)])
    assert r.method_rows(p, "full", _row(), EX_VAL, PRE["val"]) == [("fisher", "full")]
