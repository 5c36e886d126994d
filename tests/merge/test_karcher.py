"""Karcher mean on hand-computed vectors and against mergekit 0.1.5's kernel."""

import math

import pytest
import torch
from merge_test_util import run

from splice.merge import MergeContext, get_method


def test_weighted_mean_angle_on_a_circle():
    # x1 = (2, 0) at 0°, x2 = (0, 1) at 90°, weights ¾, ¼: the Karcher mean of the directions
    # on the circle is the weighted mean angle ¾·0° + ¼·90° = 22.5° (the start, the Euclidean
    # mean's direction atan(1/3) = 18.4°, is corrected by the first Riemannian step).
    # Radius: ¾·2 + ¼·1 = 1.75.
    out = run("karcher", None, [[2.0, 0.0], [0.0, 1.0]], weight=[3.0, 1.0])
    a = math.radians(22.5)
    torch.testing.assert_close(out, 1.75 * torch.tensor([math.cos(a), math.sin(a)]))


def test_zero_iterations_is_the_normalised_euclidean_mean():
    out = run("karcher", None, [[2.0, 0.0], [0.0, 1.0]], weight=[3.0, 1.0], max_iter=0)
    torch.testing.assert_close(out, 1.75 * torch.tensor([3.0, 1.0]) / math.sqrt(10))


def test_zero_input_counts_in_the_radius_only():
    # directions of (2, 0) and (0, 1) with ½, ½: 45°; radius (2 + 1 + 0)/3 = 1
    out = run("karcher", None, [[2.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    torch.testing.assert_close(out, torch.tensor([1.0, 1.0]) / math.sqrt(2))
    torch.testing.assert_close(run("karcher", None, [[0.0, 0.0], [0.0, 0.0]]), torch.zeros(2))


mk_registry = pytest.importorskip("mergekit.merge_methods.registry")


@pytest.mark.parametrize(("max_iter", "tol"), [(10, 1e-5), (2, 1e-3), (50, 1e-7)])
def test_matches_mergekit(max_iter, tol):
    from mergekit.merge_methods.base import TensorGroup

    g = torch.Generator().manual_seed(4)
    tensors = [torch.randn(7, 3, generator=g) for _ in range(4)]
    params = {"max_iter": max_iter, "tol": tol}
    group = TensorGroup.from_tensors([t.clone() for t in tensors])
    (expected,) = mk_registry.get("karcher")([group], parameters=params)
    actual = get_method("karcher")(
        None, [t.clone() for t in tensors], MergeContext(dialect="mergekit"), **params
    )
    torch.testing.assert_close(actual, expected, atol=1e-6, rtol=1e-6)
