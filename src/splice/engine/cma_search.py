"""A budgeted, seeded, bounded CMA-ES minimisation (the `cma` package, Hansen's pycma).

    result = cma_minimize(f, dims=3, budget=40, seed=0, bounds=(-1.5, 1.5))
    result.best_x, result.best_value, result.evaluations

``budget`` counts calls of ``f`` (each is a full objective evaluation, e.g. one forward pass
over the few examples in LoraHub). CMA-ES samples a population of λ = 4 + ⌊3 ln n⌋
candidates per generation (pycma's default) from N(m, σ² C); whole generations are told to
the strategy while the budget allows, and a last partial generation is evaluated (its
candidates count for the best point) without being told. The answer is the best candidate
evaluated (lowest value; ties: the earliest), not the strategy's mean.

Early stopping: with ``patience = N``, the search stops after N whole generations in a row
that did not lower the best value (``stopped = "patience"``); otherwise it runs until the
budget is spent (``stopped = "budget"``). A lower value counts as an improvement only when
it is lower by more than ``min_delta`` (default 0: any strict improvement).

Bounds: pycma's ``bounds`` option (its BoundTransform: candidates are mapped into the box
before evaluation, so every evaluated x is inside it).

Determinism: the strategy draws its normal samples from a private
``numpy.random.RandomState(seed)`` (pycma's ``randn`` option, with its own ``seed`` option
off); numpy's global generator is saved and restored around the search, so the same seed
gives the same candidates and the caller's random state is untouched.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from splice.errors import SpliceError


class SearchError(SpliceError):
    pass


@dataclass
class SearchResult:
    best_x: list[float]
    best_value: float
    evaluations: list[tuple[list[float], float]] = field(default_factory=list)
    generations: int = 0  # generations evaluated (a last partial one included)
    stopped: str = "budget"  # "budget" or "patience" (early stop)


def cma_minimize(
    objective: Callable[[list[float]], float],
    dims: int,
    *,
    budget: int,
    seed: int = 0,
    bounds: tuple[float, float] = (-1.5, 1.5),
    x0: list[float] | None = None,
    sigma0: float | None = None,
    on_evaluation: Callable[[int, float, float], None] | None = None,
    patience: int | None = None,
    min_delta: float = 0.0,
    include_x0: bool = False,
    objective_many: Callable[[list[list[float]]], list[float]] | None = None,
) -> SearchResult:
    """Minimise ``objective`` over ``dims`` values in ``bounds`` with at most ``budget``
    evaluations. ``x0`` defaults to zeros (clipped into the bounds), ``sigma0`` to a sixth
    of the bounds' width (most of a N(x0, σ0²) sample then lies inside the box).
    ``on_evaluation(index, value, best so far)`` is called after each evaluation.
    ``patience``: stop after that many generations without improvement (None: never).
    ``include_x0``: evaluate the start point first (it counts against the budget and for
    the best point, so the answer is never worse than the start; it is not told to the
    strategy). ``objective_many``: evaluates a list of points at once (one generation's
    candidates, e.g. as parallel Ray tasks) in place of ``objective``; it returns the values
    in order, so the search is the same."""
    lower, upper = float(bounds[0]), float(bounds[1])
    if dims < 1:
        raise SearchError("nothing to search: no dimensions")
    if budget < 1:
        raise SearchError(f"budget must be at least 1 evaluation (got {budget})")
    if not (math.isfinite(lower) and math.isfinite(upper) and lower < upper):
        raise SearchError(f"bounds must be finite with lower < upper (got {bounds})")
    start = [min(max(0.0, lower), upper)] * dims if x0 is None else [float(v) for v in x0]
    if len(start) != dims:
        raise SearchError(f"x0 has {len(start)} values for {dims} dimensions")
    sigma = (upper - lower) / 6 if sigma0 is None else float(sigma0)
    if not (math.isfinite(sigma) and sigma > 0):
        raise SearchError(f"sigma0 must be positive and finite (got {sigma0})")
    if patience is not None and patience < 1:
        raise SearchError(f"patience must be at least 1 generation (got {patience})")
    if not (math.isfinite(min_delta) and min_delta >= 0):
        raise SearchError(f"min_delta must be finite and >= 0 (got {min_delta})")

    import cma

    saved = np.random.get_state()
    rng = np.random.RandomState(seed)
    try:
        np.random.seed(seed)  # anything pycma draws outside `randn` is seeded too
        options = {
            "bounds": [lower, upper],
            "randn": rng.randn,
            "seed": float("nan"),  # pycma: "do nothing" (our randn is already seeded)
            "verbose": -9,
            "verb_log": 0,
            "verb_disp": 0,
        }
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pycma's notes (e.g. on dimension 1)
            es = cma.CMAEvolutionStrategy(start, sigma, options)
            result = SearchResult([], math.inf)
            stale = 0  # generations in a row without improvement

            def evaluate_all(xs: list) -> list[float]:
                points = [[float(v) for v in x] for x in xs]
                if objective_many is None:
                    return [record(p, objective(p)) for p in points]
                values = objective_many(points)
                return [record(p, v) for p, v in zip(points, values, strict=True)]

            def record(point: list[float], value: float) -> float:
                value = float(value)
                result.evaluations.append((point, value))
                if math.isfinite(value) and value < result.best_value:
                    result.best_x, result.best_value = point, value
                if on_evaluation is not None:
                    on_evaluation(len(result.evaluations), value, result.best_value)
                return value if math.isfinite(value) else 1e300  # worst, not NaN

            if include_x0:
                evaluate_all([[min(max(v, lower), upper) for v in start]])
            while len(result.evaluations) < budget:
                if patience is not None and stale >= patience:
                    result.stopped = "patience"
                    break
                best_before = result.best_value
                candidates = es.ask()
                left = budget - len(result.evaluations)
                values = evaluate_all(candidates[:left])
                result.generations += 1
                improved = result.best_value < best_before - min_delta or (
                    math.isinf(best_before) and math.isfinite(result.best_value)
                )
                stale = 0 if improved else stale + 1
                if len(values) == len(candidates):
                    es.tell(candidates, values)
    finally:
        np.random.set_state(saved)
    if not result.best_x:
        raise SearchError("the objective gave no finite value; cannot pick a point")
    return result
