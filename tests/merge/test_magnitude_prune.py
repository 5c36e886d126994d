import pytest
import torch
from merge_test_util import MERGEKIT, run

from splice.errors import MergeValidationError
from splice.merge import KeepRule, MergeContext, TopKThreshold, get_method

BASE = [1.0] * 6
D1 = [3.0, -1.0, 2.0, 0.5, -4.0, 1.0]
D2 = [-2.0, 2.0, 1.0, -3.0, -1.0, 0.2]


def models(*deltas):
    return [[1.0 + x for x in d] for d in deltas]


# density 0.5, scope tensor: D1 -> [3,0,2,0,-4,0], D2 -> [-2,2,0,-3,0,0]


def test_tensor_scope_weighted_sum():
    out = run(
        "magnitude_prune", BASE, models(D1, D2), weight=[1.0, 0.5], density=0.5, scope="tensor"
    )
    # [3,0,2,0,-4,0] + 0.5*[-2,2,0,-3,0,0] = [2,1,2,-1.5,-4,0]; + 1
    torch.testing.assert_close(out, torch.tensor([3.0, 2.0, 3.0, -0.5, -3.0, 1.0]))


def test_normalize_and_lambda():
    out = run(
        "magnitude_prune",
        BASE,
        models(D1, D2),
        weight=[1.0, 0.5],
        density=0.5,
        scope="tensor",
        normalize=True,
        **{"lambda": 3.0},
    )
    # [2,1,2,-1.5,-4,0] / 1.5 * 3 = [4,2,4,-3,-8,0]; + 1
    torch.testing.assert_close(out, torch.tensor([5.0, 3.0, 5.0, -2.0, -7.0, 1.0]))


def test_model_scope_keep_rules():
    method = get_method("magnitude_prune")
    assert method.model_stats({"density": [0.5, 0.25], "scope": "model"}) == [
        TopKThreshold(0, 0.5),
        TopKThreshold(1, 0.25),
    ]
    # D1: > 2 plus one tie at 2 -> [3,0,2,0,-4,0]
    # D2: |D2| = [2,2,1,3,1,.2]: > 2 plus the first tie at 2 -> [-2,0,0,-3,0,0]
    # the answers are keyed by the request itself: model index and density
    rules = {TopKThreshold(0, 0.5): KeepRule(2.0, 1), TopKThreshold(1, 0.5): KeepRule(2.0, 1)}
    out = run(
        "magnitude_prune", BASE, models(D1, D2), ctx=MergeContext(model_stats=rules), density=0.5
    )
    torch.testing.assert_close(out, torch.tensor([2.0, 1.0, 3.0, -2.0, -3.0, 1.0]))


def test_mergekit_count_rule_in_mergekit_dialect():
    # density 0.1 of 6: splice round(0.6) = 1, mergekit max(1, int(0.6)) = 1; 0.05: 0 vs 1
    splice = run("magnitude_prune", BASE, models(D1), density=0.05, scope="tensor")
    torch.testing.assert_close(splice, torch.tensor(BASE))
    mk = run("magnitude_prune", BASE, models(D1), density=0.05, scope="tensor", ctx=MERGEKIT)
    torch.testing.assert_close(mk, torch.tensor([1.0, 1.0, 1.0, 1.0, -3.0, 1.0]))


def test_density_is_required():
    with pytest.raises(MergeValidationError, match="needs parameter 'density'"):
        run("magnitude_prune", BASE, models(D1))
