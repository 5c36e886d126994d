"""TIES golden values, computed by hand in the comments."""

import pytest
import torch
from merge_test_util import MERGEKIT, run

from splice.errors import MergeValidationError
from splice.merge import KeepRule, MergeContext, TensorTopK, TopKThreshold, get_method

BASE = [1.0] * 6
D1 = [3.0, -1.0, 2.0, 0.5, -4.0, 1.0]
D2 = [-2.0, 2.0, 1.0, -3.0, -1.0, 0.2]
D3 = [1.0, -3.0, -1.0, 1.0, 2.0, 0.1]


def models(*deltas):
    return [[1.0 + x for x in d] for d in deltas]


# density 0.5 of 6 entries keeps 3 per task vector (scope tensor):
#   D1 -> [ 3,  0, 2,  0, -4, 0]
#   D2 -> [-2,  2, 0, -3,  0, 0]   (|2| twice: both kept, |3| kept)
#   D3 -> [ 1, -3, 0,  0,  2, 0]   (three |1| tie for the last place: the first, index 0)
# sum  =  [ 2, -1, 2, -3, -2, 0]  -> elected sign [+, -, +, -, -, +]
TRIM = dict(density=0.5, scope="tensor")


def test_sum_majority_disjoint_mean():
    out = run("ties", BASE, models(D1, D2, D3), **TRIM)
    # agreeing: [3,1] [-3] [2] [-3] [-4] [] -> means [2,-3,2,-3,-4,0]
    torch.testing.assert_close(out, torch.tensor([3.0, -2.0, 3.0, -2.0, -3.0, 1.0]))


def test_disjoint_sum_and_normalize_false():
    expected = torch.tensor([5.0, -2.0, 3.0, -2.0, -3.0, 1.0])  # sums [4,-3,2,-3,-4,0]
    torch.testing.assert_close(
        run("ties", BASE, models(D1, D2, D3), disjoint="sum", **TRIM), expected
    )
    torch.testing.assert_close(
        run("ties", BASE, models(D1, D2, D3), normalize=False, **TRIM), expected
    )


def test_disjoint_wins_over_normalize():
    out = run("ties", BASE, models(D1, D2, D3), normalize=False, disjoint="mean", **TRIM)
    torch.testing.assert_close(out, torch.tensor([3.0, -2.0, 3.0, -2.0, -3.0, 1.0]))


def test_disjoint_max():
    out = run("ties", BASE, models(D1, D2, D3), disjoint="max", **TRIM)
    # largest agreeing magnitude with the elected sign: [3,-3,2,-3,-4,0]
    torch.testing.assert_close(out, torch.tensor([4.0, -2.0, 3.0, -2.0, -3.0, 1.0]))


def test_count_majority():
    out = run("ties", BASE, models(D1, D2, D3), majority="count", **TRIM)
    # sign counts [+1, 0, +1, -1, 0, 0] -> elected [+, +, +, -, +, +]
    # agreeing means: [(3+1)/2, 2, 2, -3, 2, 0]
    torch.testing.assert_close(out, torch.tensor([3.0, 3.0, 3.0, -2.0, 3.0, 1.0]))


def test_weights_and_lambda():
    out = run("ties", BASE, models(D1, D2, D3), weight=[2.0, 1.0, 1.0], **TRIM, **{"lambda": 0.5})
    # v1 = [6,0,4,0,-8,0]; sum = [5,-1,4,-3,-6,0] -> [+,-,+,-,-,+]
    # merged = [(6+1)/(2+1), -3/1, 4/2, -3/1, -8/2, 0] = [7/3,-3,2,-3,-4,0]; *0.5; +1
    torch.testing.assert_close(out, torch.tensor([13 / 6, -0.5, 2.0, -0.5, -1.0, 1.0]))


def test_density_one_is_sign_elected_mean():
    out = run("ties", BASE, models(D1, D2, D3), scope="tensor")
    # sum [2,-2,2,-1.5,-3,1.3] -> [+,-,+,-,-,+]
    # means [(3+1)/2, (-1-3)/2, (2+1)/2, -3, (-4-1)/2, (1+.2+.1)/3]
    expected = torch.tensor([3.0, -1.0, 2.5, -2.0, -1.5, 1.0 + 1.3 / 3])
    torch.testing.assert_close(out, expected)


def test_count_rule_differs_by_dialect():
    # density 0.45 of 6: splice keeps round(2.7) = 3, mergekit int(2.7) = 2
    splice = run("ties", BASE, models(D1), density=0.45, scope="tensor")
    torch.testing.assert_close(splice, torch.tensor([4.0, 1.0, 3.0, 1.0, -3.0, 1.0]))
    mk = run("ties", BASE, models(D1), density=0.45, ctx=MERGEKIT)  # scope tensor by default
    torch.testing.assert_close(mk, torch.tensor([4.0, 1.0, 1.0, 1.0, -3.0, 1.0]))


def test_rescale_restores_l1():
    out = run("ties", BASE, models(D1), rescale=True, **TRIM)
    # kept [3,0,2,0,-4,0] (L1 9) scaled to the L1 of D1 (11.5)
    expected = torch.tensor([1 + 34.5 / 9, 1.0, 1 + 23 / 9, 1.0, 1 - 46 / 9, 1.0])
    torch.testing.assert_close(out, expected)


def test_model_scope_uses_keep_rules():
    ties = get_method("ties")
    params = {"density": [0.5, 1.0, 0.0], "scope": "model"}
    assert ties.model_stats(params) == [TopKThreshold(model_index=0, density=0.5)]
    # scope tensor: a per-tensor request, answered only for a tensor merged in row chunks
    assert ties.model_stats({**params, "scope": "tensor"}) == [TensorTopK(0, 0.5)]
    # |D1| = [3,1,2,.5,4,1]: rule "> 2, plus one tie at 2" keeps [3,0,2,0,-4,0]
    ctx = MergeContext(model_stats={TopKThreshold(0, 0.5): KeepRule(2.0, 1)})
    out = run("ties", BASE, models(D1), ctx=ctx, density=0.5)
    torch.testing.assert_close(out, torch.tensor([4.0, 1.0, 3.0, 1.0, -3.0, 1.0]))
    ctx = MergeContext(model_stats={TopKThreshold(0, 0.5): KeepRule(2.0, 0)})
    out = run("ties", BASE, models(D1), ctx=ctx, density=0.5)
    torch.testing.assert_close(out, torch.tensor([4.0, 1.0, 1.0, 1.0, -3.0, 1.0]))


def test_model_scope_without_statistic_is_a_clear_error():
    with pytest.raises(
        MergeValidationError, match=r"did not answer TopKThreshold\(model_index=0.*scope 'tensor'"
    ):
        run("ties", BASE, models(D1), density=0.5)


def test_density_zero_keeps_the_base():
    out = run("ties", BASE, models(D1, D2), density=0.0)
    torch.testing.assert_close(out, torch.tensor(BASE))


def test_tensor_scope_uses_a_given_chunk_rule():
    """A row chunk's `TensorTopK` answer replaces the method's own per-tensor selection
    (which keeps the top 3 of |D1| = [3,1,2,.5,4,1]: [4,1,3,1,-3,1])."""
    # "> 0.5": five entries kept
    ctx = MergeContext(model_stats={TensorTopK(0, 0.5): KeepRule(0.5, 0)}, dialect="mergekit")
    out = run("ties", BASE, models(D1), ctx=ctx, density=0.5)
    torch.testing.assert_close(out, torch.tensor([4.0, 0.0, 3.0, 1.0, -3.0, 2.0]))
    # "> 1, plus the first entry equal to 1" (flat order: the -1)
    ctx = MergeContext(model_stats={TensorTopK(0, 0.5): KeepRule(1.0, 1)})
    out = run("ties", BASE, models(D1), ctx=ctx, density=0.5, scope="tensor")
    torch.testing.assert_close(out, torch.tensor([4.0, 0.0, 3.0, 1.0, -3.0, 1.0]))


# weighted_votes=False (AdaMerging++'s order): the sign is elected on the unweighted δ̂_i.
#   δ1 = [1, -1], δ2 = [-2, 0.5], weights [1, 0.1], base 0, no trim
#   weighted votes:   Σ w δ = [0.8, -0.95] -> s = [+, -]
#   unweighted votes: Σ δ   = [-1, -0.5]   -> s = [-, -]; agreeing: entry 0 δ2, entry 1 δ1
UNWEIGHTED = dict(density=1.0, weight=[1.0, 0.1], weighted_votes=False)


@pytest.mark.parametrize(
    ("disjoint", "expected"),
    [
        ("sum", [-0.2, -1.0]),  # [0.1 · -2, 1 · -1]
        ("mean", [-2.0, -1.0]),  # [-0.2 / 0.1, -1 / 1]
        ("max", [-0.2, -1.0]),  # s · max |w δ| over the agreeing
    ],
)
def test_unweighted_votes(disjoint, expected):
    out = run("ties", [0.0, 0.0], [[1.0, -1.0], [-2.0, 0.5]], disjoint=disjoint, **UNWEIGHTED)
    torch.testing.assert_close(out, torch.tensor(expected))
    weighted = {**UNWEIGHTED, "weighted_votes": True}
    out = run("ties", [0.0, 0.0], [[1.0, -1.0], [-2.0, 0.5]], disjoint="sum", **weighted)
    torch.testing.assert_close(out, torch.tensor([1.0, -1.0]))  # s = [+, -]


def test_unweighted_votes_keep_agreeing_entries_of_a_negative_weight():
    # δ = [2], [1], weights [-1, 1]: unweighted s = sign(3) = +, both agree: -2 + 1 = -1;
    # weighted s = sign(-2 + 1) = -, only v1 = -2 agrees: -2
    params = dict(disjoint="sum", weight=[-1.0, 1.0], density=1.0)
    out = run("ties", [0.0], [[2.0], [1.0]], weighted_votes=False, **params)
    torch.testing.assert_close(out, torch.tensor([-1.0]))
    torch.testing.assert_close(run("ties", [0.0], [[2.0], [1.0]], **params), torch.tensor([-2.0]))


def test_unweighted_votes_in_the_mergekit_dialect_use_splice_arithmetic():
    models = [[1.0, -1.0], [-2.0, 0.5]]
    out = run("ties", [0.0, 0.0], models, MERGEKIT, disjoint="sum", **UNWEIGHTED)
    torch.testing.assert_close(out, torch.tensor([-0.2, -1.0]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_per_tensor_trim_compiled_keep_rule_equals_the_mask_path(monkeypatch, dtype):
    """splice's per-tensor trim (ties first in flat order) as a keep rule of the k-th
    largest applied in one compiled pass: the same bits as the torch mask path, on
    bf16-born values with many ties at the threshold."""
    from splice.merge.methods import _common

    g = torch.Generator().manual_seed(21)
    delta = (torch.randn(64, 48, generator=g) * 0.01).bfloat16().to(dtype)
    ctx = MergeContext(tensor_name="w")
    for density in (0.1, 0.37, 0.9):
        fast = _common.magnitude_trim_(
            delta.clone(), density, 0, scope="tensor", ctx=ctx, rescale=False
        )
        with monkeypatch.context() as m:
            m.setattr(_common, "keep_rule_trim_", lambda d, rule: False)
            slow = _common.magnitude_trim_(
                delta.clone(), density, 0, scope="tensor", ctx=ctx, rescale=False
            )
        assert int((fast != 0).sum()) == round(density * delta.numel())
        assert torch.equal(fast.view(torch.uint8), slow.view(torch.uint8))
