"""Which registered merge methods the bench runs, with which defaults and sweeps."""

from __future__ import annotations

import pytest

from splice.bench.methods import CORE, TABLE, best_point, select_methods
from splice.errors import SpliceError
from splice.merge import all_methods, get_method


def _by_name(planned):
    return {p.name: p for p in planned}


def test_all_on_four_experts():
    planned, skipped = select_methods("all", 4)
    reasons = {s.name: s.reason for s in skipped}
    assert set(reasons) == {
        "slerp",
        "passthrough",
        "lines",
        "metrics_weighted",
        "fisher",
        "fisher_graft",
        "regmean",
    }
    assert "data" in reasons["fisher"] and "data" in reasons["regmean"]
    assert "exactly 1" in reasons["slerp"] and "exactly 1" in reasons["passthrough"]
    assert "alpha, beta" in reasons["lines"]
    assert "metric" in reasons["metrics_weighted"]
    names = _by_name(planned)
    # every registered method is either planned or skipped, none twice
    assert set(names) | set(reasons) == {
        *(m.name for m in all_methods()),
        *(m.label for m in all_methods("low_rank")),
    }
    # LoRA-native methods are rows too (of the LoRA experts' table), each runnable as is
    low_rank = {n for n, p in names.items() if p.low_rank}
    assert low_rank == {f"lora:{m.name}" for m in all_methods("low_rank")}
    assert names["lora:dare"].params == {"density": 0.5} and names["lora:dare"].random
    assert names["lora:svd"].sweep == ("lambda", [0.3, 0.5, 0.7, 1.0])
    assert not names["ties"].low_rank and names["lora:lego"].sweep is None
    assert names["ties"].params == {"density": 0.2}
    assert names["ties"].sweep == ("lambda", [0.6, 1.0, 1.4, 1.8])
    assert names["task_arithmetic"].sweep == ("lambda", [0.3, 0.5, 0.7, 1.0])
    assert names["multislerp"].params == {"weight": 1.0}
    assert names["tsv"].sweep is None and names["linear"].sweep is None
    assert names["dare_ties"].random and not names["ties"].random


def test_core_list_and_table_are_registered_and_sufficient():
    for name in [*CORE, *TABLE]:
        get_method(name)  # raises for an unknown name
    planned, skipped = select_methods("core", 4)
    assert [p.name for p in planned] == CORE and skipped == []
    # every required parameter of a core method has a value
    for p in planned:
        required = [x.name for x in get_method(p.name).params if x.required]
        assert set(required) <= set(p.params), p.name


def test_model_count_limits():
    _, skipped = select_methods(["model_stock", "linear"], 1)
    assert [(s.name, "at least 2" in s.reason) for s in skipped] == [("model_stock", True)]
    planned, skipped = select_methods(["slerp"], 1, params={"slerp": {"t": 0.5}})
    assert [p.name for p in planned] == ["slerp"] and not skipped


def test_overrides_supply_and_replace():
    planned, skipped = select_methods(
        ["lines", "ties"],
        4,
        params={"lines": {"alpha": 0.1, "beta": 0.5}, "ties": {"density": 0.3}},
        grids={"ties": {"density": [0.1, 0.2]}},
    )
    assert not skipped
    p = _by_name(planned)
    assert p["lines"].params == {"alpha": 0.1, "beta": 0.5}
    assert p["ties"].params == {"density": 0.3}
    assert p["ties"].sweep == ("density", [0.1, 0.2])


def test_no_sweep():
    planned, _ = select_methods("core", 3, sweep=False)
    assert all(p.sweep is None for p in planned)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"selection": ["tise"]}, "did you mean 'ties'"),
        ({"params": {"ties": {"densty": 0.2}}}, "did you mean 'density'"),
        ({"grids": {"task_arithmetic": {"lamda": [1.0]}}}, "did you mean 'lambda'"),
        ({"params": {"nope": {}}}, "unknown merge method"),
    ],
)
def test_errors(kw, match):
    selection = kw.pop("selection", "core")
    with pytest.raises(SpliceError, match=match):
        select_methods(selection, 4, **kw)


def test_best_point_first_maximum_skipping_unscored():
    assert best_point([0.5, 0.7, 0.7, 0.6]) == 1  # a tie keeps the first (grid order)
    assert best_point([None, 0.2, None, 0.1]) == 1
    assert best_point([0.9, None, 0.95]) == 2
    assert best_point([None, None]) is None and best_point([]) is None


def test_default_setting_configured_value_or_registered_default():
    (ties,), _ = select_methods(["ties"], 2)
    param, value, params = ties.default_setting()
    assert param == ties.sweep[0] and value == get_method("ties").param(param).default
    assert params == {**ties.params, param: value}
    (ties,), _ = select_methods(["ties"], 2, {"ties": {param: 0.7}})
    assert ties.default_setting()[1] == 0.7
    (rpp,), _ = select_methods(["regmean++"], 2)  # not a registered method: its own default
    assert rpp.default_setting()[1] == rpp.params[rpp.sweep[0]]
