"""Fast Fisher Grafting: the saliency mask by hand, magnitude pruning when the Fisher is
constant (the recipe path: tests/engine/test_fisher_graft_recipe.py)."""

from __future__ import annotations

import pytest
import torch

from splice.errors import MergeValidationError
from splice.merge import MergeContext, get_method
from splice.merge.stats import DataStatistic, DataStats

FISHER = DataStatistic("fisher")


def _graft(base, thetas, fishers, **params):
    ctx = MergeContext(
        tensor_name="t", model_stats={FISHER: DataStats(tuple(fishers), (1.0,) * len(fishers))}
    )
    return get_method("fisher_graft")(base.clone(), [t.clone() for t in thetas], ctx, **params)


def test_saliency_mask_by_hand():
    base = torch.tensor([1.0, 1.0, 1.0, 1.0])
    theta = base + torch.tensor([1.0, 2.0, -3.0, 4.0])
    fisher = torch.tensor([16.0, 1.0, 1.0, 0.01])
    # saliency F δ²: [16, 4, 9, 0.16] -> density 0.5 keeps entries 0 and 2
    out = _graft(base, [theta], [fisher], density=0.5)
    assert torch.equal(out, torch.tensor([2.0, 1.0, -2.0, 1.0]))
    # magnitude pruning would keep entries 2 and 3 instead
    mp = get_method("magnitude_prune")
    ctx = MergeContext(tensor_name="t")
    kept = mp(base.clone(), [theta.clone()], ctx, density=0.5, scope="tensor")
    assert torch.equal(kept, torch.tensor([1.0, 1.0, -2.0, 5.0]))
    # two models, weights and λ: base + λ Σ w_i δ̂_i
    theta2 = base + torch.tensor([0.0, -1.0, 0.0, 2.0])
    fisher2 = torch.tensor([1.0, 9.0, 1.0, 1.0])  # saliency [0, 9, 0, 4] -> keeps entry 1
    out = _graft(
        base,
        [theta, theta2],
        [fisher, fisher2],
        density=[0.5, 0.25],
        weight=[1.0, 2.0],
        **{"lambda": 0.5},
    )
    # δ̂1 = [1, 0, −3, 0], δ̂2 = [0, −1, 0, 0]: base + 0.5 (δ̂1 + 2 δ̂2)
    assert torch.allclose(out, torch.tensor([1.5, 0.0, -0.5, 1.0]))


def test_constant_fisher_is_magnitude_pruning():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 5, generator=g)
    thetas = [base + torch.randn(6, 5, generator=g) for _ in range(3)]
    out = _graft(base, thetas, [torch.full((6, 5), 0.3)] * 3, density=0.4)
    mp = get_method("magnitude_prune")(
        base.clone(),
        [t.clone() for t in thetas],
        MergeContext(tensor_name="t"),
        density=0.4,
        scope="tensor",
    )
    assert torch.equal(out, mp)


def test_missing_fisher_is_an_error():
    with pytest.raises(MergeValidationError, match="no Fisher"):
        _graft(torch.zeros(2), [torch.ones(2)], [None], density=0.5)


def test_merge_with_statistics_takes_the_base():
    """The state-dict entry point (`merge_with_statistics(..., base=)`, what `splice bench`
    uses) gives the hand-computed graft; without a base it is an error."""
    from splice.merge.data_merge import merge_with_statistics

    base = {"w": torch.tensor([1.0, 1.0, 1.0, 1.0]), "n": torch.tensor([3])}
    theta = {"w": base["w"] + torch.tensor([1.0, 2.0, -3.0, 4.0]), "n": torch.tensor([3])}
    fisher = {"w": torch.tensor([16.0, 1.0, 1.0, 0.01])}
    out = merge_with_statistics("fisher_graft", [theta], [fisher], base=base, density=0.5)
    assert torch.equal(out["w"], torch.tensor([2.0, 1.0, -2.0, 1.0]))
    assert torch.equal(out["n"], torch.tensor([3]))
    with pytest.raises(MergeValidationError, match="needs a base model"):
        merge_with_statistics("fisher_graft", [theta], [fisher], density=0.5)
