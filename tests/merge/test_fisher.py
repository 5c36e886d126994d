"""Fisher merging (Matena & Raffel 2022): the weighted average by hand, the Fisher of a tiny
linear model by hand (per example and the batch approximation), parity with FusionBench's
formula, and errors."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from splice.errors import DataError, MergeValidationError
from splice.merge import MergeContext, get_method
from splice.merge.data_merge import merge_with_statistics
from splice.merge.data_stats import collect_fisher
from splice.merge.stats import DataStatistic, DataStats

FISHER = DataStatistic("fisher")


def _fisher(thetas, fishers, norms=None, **params):
    norms = norms or (1.0,) * len(fishers)
    ctx = MergeContext(tensor_name="t", model_stats={FISHER: DataStats(tuple(fishers), norms)})
    return get_method("fisher")(None, [t.clone() for t in thetas], ctx, **params)


THETAS = [torch.tensor([1.0, 2.0]), torch.tensor([3.0, 6.0])]
FISHERS = [torch.tensor([1.0, 0.0]), torch.tensor([1.0, 3.0])]


def test_weighted_average_by_hand():
    # entry 0: (1·1 + 1·3) / 2 = 2; entry 1: (0·2 + 3·6) / 3 = 6
    out = _fisher(THETAS, FISHERS, normalize=False, floor=0.0)
    assert torch.allclose(out, torch.tensor([2.0, 6.0]))
    # weights 3 : 1 -> entry 0: (3·1 + 1·3) / 4 = 1.5; entry 1 only model 1 counts: 6
    out = _fisher(THETAS, FISHERS, normalize=False, floor=0.0, weight=[3.0, 1.0])
    assert torch.allclose(out, torch.tensor([1.5, 6.0]))
    # the floor makes an all-zero entry the weighted average: (1 + 3) / 2
    out = _fisher(THETAS, [torch.zeros(2), torch.zeros(2)], normalize=False, floor=1e-6)
    assert torch.allclose(out, torch.tensor([2.0, 4.0]))
    # equal Fishers: the plain average whatever they are
    out = _fisher(THETAS, [FISHERS[1], FISHERS[1]], normalize=False, floor=0.0)
    assert torch.allclose(out, torch.tensor([2.0, 4.0]))


def test_normalization_by_whole_model_norm():
    # ‖F_1‖ = 1, ‖F_2‖ = √10: c = (1, 1/√10); entry 0: (1 + 3/√10) / (1 + 1/√10)
    sds = [{"t": t} for t in THETAS]
    out = merge_with_statistics("fisher", sds, [{"t": f} for f in FISHERS], floor=0.0)
    c = 1 / math.sqrt(10)
    assert torch.allclose(out["t"], torch.tensor([(1 + 3 * c) / (1 + c), 6.0]))


def _fusionbench_fisher(thetas, fishers, coeffs, eps=1e-6):
    """FusionBench's `merging_with_fisher_weights` (normalize_fisher_weight=True) for one
    tensor, written from its code: norms over the whole model, coefficients c_i scaled by
    (1 / (‖F_i‖ + eps)) / Σ_j (1 / (‖F_j‖ + eps)), Fishers + eps, Σ c F θ / Σ c F."""
    norms = torch.stack([f.norm() for f in fishers])
    inv = 1.0 / (norms + eps)
    c = torch.tensor(coeffs) * inv / inv.sum()
    f = torch.stack(fishers) + eps
    t = torch.stack(thetas)
    return (c[:, None] * f * t).sum(0) / (c[:, None] * f).sum(0)


def test_parity_with_fusionbench_formula():
    # FusionBench adds eps where splice (like Matena & Raffel) floors at it: with Fishers
    # well above 1e-6 the two agree to float precision.
    torch.manual_seed(0)
    thetas = [torch.randn(50) for _ in range(3)]
    fishers = [torch.rand(50) * s + 0.01 for s in (1.0, 5.0, 0.2)]
    sds = [{"t": t} for t in thetas]
    ours = merge_with_statistics("fisher", sds, [{"t": f} for f in fishers], weight=[1, 2, 1])
    theirs = _fusionbench_fisher(thetas, fishers, [1.0, 2.0, 1.0])
    assert torch.allclose(ours["t"], theirs, atol=1e-5)


def _regression_model():
    m = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        m.weight.copy_(torch.tensor([[1.0, 0.0]]))
    return m


def _squared_error(model, batch):
    x, y = batch
    return 0.5 * (model(x).squeeze(-1) - y) ** 2  # Gaussian NLL up to a constant


X = torch.tensor([[1.0, 2.0], [2.0, 1.0]])
Y = torch.tensor([0.0, 1.0])


def test_fisher_of_a_linear_model_by_hand():
    # residuals r = w·x − y = (1, 1); gradients r·x = (1, 2) and (2, 1)
    # per example: ((1, 4) + (4, 1)) / 2 = (2.5, 2.5)
    fisher = collect_fisher(_regression_model(), [(X, Y)], _squared_error)
    assert torch.allclose(fisher["weight"], torch.tensor([[2.5, 2.5]]))
    # batch approximation: (1 + 2, 2 + 1)² / 2 = (4.5, 4.5)
    approx = collect_fisher(_regression_model(), [(X, Y)], _squared_error, per_example=False)
    assert torch.allclose(approx["weight"], torch.tensor([[4.5, 4.5]]))
    # ... which is exact for batches of one example
    singles = [(X[i : i + 1], Y[i : i + 1]) for i in range(2)]
    exact = collect_fisher(_regression_model(), singles, _squared_error, per_example=False)
    assert torch.allclose(exact["weight"], fisher["weight"])


def test_classification_fisher_matches_per_example_autograd_and_merges():
    torch.manual_seed(1)
    nets = [nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)) for _ in range(2)]
    x, labels = torch.randn(5, 3), torch.tensor([0, 2, 1, 1, 0])

    def nll(model, batch):
        inputs, y = batch
        return nn.functional.cross_entropy(model(inputs), y, reduction="none")

    batches = [(x[:2], labels[:2]), (x[2:], labels[2:])]
    fishers = [collect_fisher(n, batches, nll) for n in nets]
    # reference: one backward per example on a fresh graph
    expected = {k: torch.zeros_like(p) for k, p in nets[0].named_parameters()}
    for i in range(5):
        nets[0].zero_grad()
        nll(nets[0], (x[i : i + 1], labels[i : i + 1])).sum().backward()
        for k, p in nets[0].named_parameters():
            expected[k] += p.grad**2 / 5
    for k in expected:
        assert torch.allclose(fishers[0][k], expected[k], atol=1e-7)
    sds = [n.state_dict() for n in nets]
    merged = merge_with_statistics("fisher", sds, fishers)
    assert not torch.allclose(merged["0.weight"], (sds[0]["0.weight"] + sds[1]["0.weight"]) / 2)


def test_hf_causal_lm_fisher_and_merge():
    from tests.tiny_hf import tiny_llama

    def sequence_nll(model, batch):
        ids = batch["input_ids"]
        logits = model(input_ids=ids).logits[:, :-1]
        nll = nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
        return nll.mean(dim=1)  # one loss per sequence

    # tied embeddings: named_parameters lists the shared weight once, the state dict twice
    models = [tiny_llama(seed=s, tie_word_embeddings=True) for s in (0, 1)]
    batches = [{"input_ids": torch.randint(0, 64, (2, 5))}]
    fishers = [collect_fisher(m, batches, sequence_nll) for m in models]
    assert set(fishers[0]) == {n for n, _ in models[0].named_parameters()}
    assert "lm_head.weight" not in fishers[0] and "lm_head.weight" in models[0].state_dict()
    assert all(bool((f >= 0).all()) for f in fishers[0].values())
    assert float(fishers[0]["model.layers.0.mlp.up_proj.weight"].sum()) > 0
    sds = [m.state_dict() for m in models]
    merged = merge_with_statistics("fisher", sds, fishers)
    assert torch.equal(merged["lm_head.weight"], merged["model.embed_tokens.weight"])
    models[0].load_state_dict(merged)


@pytest.mark.parametrize(
    ("fishers", "fragment"),
    [
        ([{"t": FISHERS[0]}, {}], "statistics are empty"),
        ([{"t": FISHERS[0]}, {"t": torch.ones(3)}], "expected (2,)"),
        ([{"t": FISHERS[0]}, {"t": torch.tensor([1.0, float("inf")])}], "not finite"),
        ([{"t": FISHERS[0]}, {"t": torch.tensor([1.0, -1.0])}], "negative"),
        ([{"t": FISHERS[0]}, {"t": torch.zeros(2)}], "zero everywhere"),
        ([{"t": FISHERS[0]}], "1 statistics for 2 models"),
    ],
)
def test_bad_statistics_are_clear_errors(fishers, fragment):
    with pytest.raises(MergeValidationError) as e:
        merge_with_statistics("fisher", [{"t": t} for t in THETAS], fishers)
    assert fragment in str(e.value)


def test_missing_fisher_and_other_errors():
    sds = [{"t": t, "u": t.clone()} for t in THETAS]
    with pytest.raises(MergeValidationError, match="model 0 has no Fisher for it"):
        merge_with_statistics("fisher", sds, [{"t": f} for f in FISHERS])
    with pytest.raises(MergeValidationError, match="needs fisher statistics"):
        get_method("fisher")(None, THETAS)
    with pytest.raises(MergeValidationError, match="every model's Fisher is zero"):
        _fisher(THETAS, [torch.zeros(2), torch.zeros(2)], normalize=False, floor=0.0)
    with pytest.raises(MergeValidationError, match="sum to 0"):
        _fisher(THETAS, FISHERS, weight=[0.0, 0.0])
    with pytest.raises(MergeValidationError, match="one loss per example"):
        collect_fisher(_regression_model(), [(X, Y)], lambda m, b: _squared_error(m, b).sum())
    with pytest.raises(DataError, match="no examples"):
        collect_fisher(_regression_model(), [], _squared_error)
