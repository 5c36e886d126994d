"""`compose`: a merge method built from a sparsifier and a combiner."""

import pytest
import torch

from splice.errors import MergeValidationError
from splice.merge import registry
from splice.merge.methods._common import linear_combine_, ties_combine_
from splice.merge.methods._compose import compose
from splice.merge.registry import MergeContext, PerModel, get_method


@pytest.fixture(autouse=True)
def scratch_registry(monkeypatch):
    """Register the test's methods in a registry of their own."""
    monkeypatch.setattr(registry, "_REGISTRY", {})


def zero_below_(deltas, *, scope: str = "x", gamma: PerModel[float] = 0.5, ctx: MergeContext):
    """Zero the entries of δ_i with |δ_i| < gamma_i."""
    for d, g in zip(deltas, gamma, strict=True):
        d.mul_(d.abs() >= g)


def test_sparsifier_then_combiner_with_one_signature():
    m = compose("t_linear", zero_below_, linear_combine_, summary="Test.", defaults={"gamma": 1})
    assert [p.name for p in m.params] == ["weight", "gamma", "lambda", "normalize", "scope"]
    assert [p.per_model for p in m.params] == [True, True, False, False, False]
    assert m.param("gamma").default == 1 and m.summary == "Test." and m.needs_base
    base = torch.tensor([1.0, 1.0, 1.0])
    models = [torch.tensor([1.5, 3.0, -1.0]), torch.tensor([0.0, 1.0, 5.0])]
    # δ = [.5, 2, -2], [-1, 0, 4]; gamma [1, 2] keeps [0, 2, -2], [0, 0, 4]; weights [1, .5]
    out = m(base, models, gamma=[1.0, 2.0], weight=[1.0, 0.5], **{"lambda": 2.0})
    assert torch.equal(out, torch.tensor([1.0, 5.0, 1.0]))
    with pytest.raises(MergeValidationError, match="'gamma'"):
        m(base, models, gamma="many")


def test_ties_combiner_without_sparsifier():
    m = compose("t_ties", None, ties_combine_, summary="Test.")
    assert [p.name for p in m.params] == [
        "weight",
        "lambda",
        "normalize",
        "disjoint",
        "majority",
        "weighted_votes",
    ]
    out = m(torch.zeros(2), [torch.tensor([3.0, -1.0]), torch.tensor([-1.0, -3.0])])
    # signs of the sums [+, -]; agreeing means [3, -2]
    assert torch.equal(out, torch.tensor([3.0, -2.0]))
    assert get_method("t_ties") is m


def test_compose_refuses_unknown_defaults_and_shared_names():
    with pytest.raises(TypeError, match="unknown parameters"):
        compose("t_bad", zero_below_, linear_combine_, summary="", defaults={"alpha": 1})

    def shares_weight_(deltas, *, weight: float = 1.0, ctx: MergeContext) -> None:
        pass

    with pytest.raises(TypeError, match="share parameter names"):
        compose("t_bad", shares_weight_, linear_combine_, summary="")
