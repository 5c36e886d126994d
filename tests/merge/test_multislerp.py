"""Multi-SLERP on hand-computed vectors and against mergekit 0.1.5's kernel."""

import math

import pytest
import torch
from merge_test_util import run

from splice.errors import MergeValidationError
from splice.merge import MergeContext, get_method


def test_orthogonal_pair_lands_on_the_arc_midpoint():
    # u1 = e1, u2 = e2, w = (½, ½): m = (½, ½), μ = (1, 1)/√2; the weighted tangent vectors
    # (½, −½)·½ + (−½, ½)·½ cancel, so the result is μ · (½·1 + ½·1) = (1, 1)/√2 — not the
    # linear midpoint (½, ½).
    out = run("multislerp", None, [[1.0, 0.0], [0.0, 1.0]], weight=[1.0, 1.0])
    torch.testing.assert_close(out, torch.tensor([1.0, 1.0]) / math.sqrt(2))


def test_task_vectors_from_a_base_with_weights():
    # base (1, 1); x1 = (2, 0) (norm 2), x2 = (0, 1) (norm 1); w = (3, 1)/4.
    # m = (¾, ¼), μ = (3, 1)/√10; radius = ¾·2 + ¼·1 = 1.75; + base
    out = run("multislerp", [1.0, 1.0], [[3.0, 1.0], [1.0, 2.0]], weight=[3.0, 1.0])
    expected = torch.tensor([3.0, 1.0]) / math.sqrt(10) * 1.75 + 1
    torch.testing.assert_close(out, expected)


def test_cancelling_antipodes():
    # two antipodal inputs with equal weights: linear fallback ½·a + ½·(−a) = 0
    out = run("multislerp", None, [[1.0, 2.0], [-1.0, -2.0]], weight=[1.0, 1.0])
    torch.testing.assert_close(out, torch.zeros(2))
    with pytest.raises(MergeValidationError, match="weighted mean direction is zero"):
        run("multislerp", None, [[1.0, 0.0], [-1.0, 0.0], [1.0, 0.0]], weight=[1.0, 2.0, 1.0])


def test_weight_is_required():
    with pytest.raises(MergeValidationError, match="needs parameter 'weight'"):
        get_method("multislerp")(None, [torch.ones(2), torch.zeros(2)], MergeContext())


mk_registry = pytest.importorskip("mergekit.merge_methods.registry")


@pytest.mark.parametrize("with_base", [False, True])
@pytest.mark.parametrize("normalize", [True, False])
def test_matches_mergekit(with_base, normalize):
    from mergekit.merge_methods.base import TensorGroup

    g = torch.Generator().manual_seed(3)
    base = torch.randn(6, 5, generator=g)
    tensors = [base + torch.randn(6, 5, generator=g) for _ in range(3)]
    params = {"weight": [0.2, 0.5, 0.9], "normalize_weights": normalize}
    if with_base:
        group = TensorGroup.from_tensors(
            [base.clone()] + [t.clone() for t in tensors], base_index=0
        )
    else:
        group = TensorGroup.from_tensors([t.clone() for t in tensors])
    (expected,) = mk_registry.get("multislerp")([group], parameters=params)
    b = base.clone() if with_base else None
    actual = get_method("multislerp")(
        b, [t.clone() for t in tensors], MergeContext(dialect="mergekit"), **params
    )
    torch.testing.assert_close(actual, expected, atol=1e-6, rtol=1e-6)


def test_inputs_all_equal_to_the_base_give_the_base():
    # three experts that left this tensor untouched (LoRA elsewhere): every x_i = 0
    out = run("multislerp", [0.5, -2.0], [[0.5, -2.0]] * 3, weight=[1.0, 1.0, 1.0])
    torch.testing.assert_close(out, torch.tensor([0.5, -2.0]))
    zeros = run("multislerp", None, [[0.0, 0.0]] * 3, weight=[1.0, 2.0, 1.0])
    torch.testing.assert_close(zeros, torch.zeros(2))
