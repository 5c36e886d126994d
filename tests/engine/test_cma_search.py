"""The CMA-ES driver's early stop and evaluated start point (`splice.engine.cma_search`;
the search itself is tested with LoraHub in tests/compose/test_lorahub.py)."""

from __future__ import annotations

import pytest

from splice.engine.cma_search import SearchError, cma_minimize


def _quadratic(target):
    return lambda x: float(sum((a - b) ** 2 for a, b in zip(x, target, strict=True)))


def test_patience_stops_after_that_many_generations_without_improvement():
    # popsize 4 + ⌊3 ln 2⌋ = 6; a flat objective never improves on the first generation
    found = cma_minimize(lambda x: 1.0, 2, budget=100, seed=0, patience=3)
    assert found.stopped == "patience"
    assert found.generations == 4 and len(found.evaluations) == 4 * 6  # 1 sets the best, 3 stale


def test_patience_does_not_stop_an_improving_search():
    found = cma_minimize(_quadratic([0.3, -0.2]), 2, budget=60, seed=0, patience=5)
    assert found.stopped == "budget" and len(found.evaluations) == 60


def test_min_delta_counts_only_large_enough_improvements():
    loose = cma_minimize(_quadratic([0.3, -0.2]), 2, budget=300, seed=0, patience=2)
    strict = cma_minimize(
        _quadratic([0.3, -0.2]), 2, budget=300, seed=0, patience=2, min_delta=0.01
    )
    assert strict.stopped == "patience"
    assert len(strict.evaluations) < len(loose.evaluations)


def test_include_x0_evaluates_the_start_first_and_counts_it():
    found = cma_minimize(
        _quadratic([0.0, 0.0]), 2, budget=7, seed=0, x0=[0.0, 0.0], include_x0=True
    )
    assert found.evaluations[0] == ([0.0, 0.0], 0.0)
    assert len(found.evaluations) == 7 and found.best_x == [0.0, 0.0]
    # with patience: the start is generation 0; one generation that does not beat it, stop
    found = cma_minimize(
        _quadratic([0.0, 0.0]), 2, budget=50, seed=0, x0=[0.0, 0.0], include_x0=True, patience=1
    )
    assert found.stopped == "patience" and len(found.evaluations) == 1 + 6


@pytest.mark.parametrize("kw", [{"patience": 0}, {"min_delta": -1.0}])
def test_bad_early_stop_settings(kw):
    with pytest.raises(SearchError):
        cma_minimize(_quadratic([0.0]), 1, budget=5, **kw)
