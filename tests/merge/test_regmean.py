"""RegMean (Jin et al. 2023): the closed form by hand, its properties, Gram collection, the
Python entry point and its errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from splice.errors import MergeValidationError
from splice.merge import MergeContext, get_method
from splice.merge.data_merge import merge_with_statistics
from splice.merge.data_stats import collect_gram, load_statistics, save_statistics
from splice.merge.stats import DataStatistic, DataStats

GRAM = DataStatistic("gram")


def _regmean(weights, grams, **params):
    ctx = MergeContext(
        tensor_name="w", model_stats={GRAM: DataStats(tuple(grams), (1.0,) * len(grams))}
    )
    return get_method("regmean")(None, [w.clone() for w in weights], ctx, **params)


def test_diagonal_grams_by_hand():
    # Diagonal Grams: each input column j is the average of the models' columns weighted by
    # G_i[j, j]. Column 0: (2·[1, 3] + 1·[0, 1]) / 3; column 1: ([2, 4] + [1, 0]) / 2.
    w1 = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    w2 = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    g1, g2 = torch.diag(torch.tensor([2.0, 1.0])), torch.eye(2)
    out = _regmean([w1, w2], [g1, g2], alpha=1.0)
    assert torch.allclose(out, torch.tensor([[2 / 3, 3 / 2], [7 / 3, 2.0]]))


def test_alpha_scales_off_diagonal_by_hand():
    # G̃1 = 0.5·[[2, 1], [1, 2]] + 0.5·diag(2, 2) = [[2, .5], [.5, 2]], G̃2 = I;
    # W1 = I, W2 = 0: Wᵀ = (G̃1 + I)⁻¹ G̃1 = [[3, -.5], [-.5, 3]] / 8.75 · G̃1
    #               = [[5.75, .5], [.5, 5.75]] / 8.75 = [[23, 2], [2, 23]] / 35.
    g1 = torch.tensor([[2.0, 1.0], [1.0, 2.0]])
    out = _regmean([torch.eye(2), torch.zeros(2, 2)], [g1, torch.eye(2)], alpha=0.5)
    assert torch.allclose(out, torch.tensor([[23.0, 2.0], [2.0, 23.0]]) / 35)
    # α = 0 keeps only the diagonals: columns weighted 2 : 1, so W = diag(2/3, 2/3).
    out0 = _regmean([torch.eye(2), torch.zeros(2, 2)], [g1, torch.eye(2)], alpha=0.0)
    assert torch.allclose(out0, torch.eye(2) * 2 / 3)


def test_identical_grams_give_the_plain_average():
    torch.manual_seed(0)
    a = torch.randn(5, 4)
    gram = a.T @ a + torch.eye(4)
    weights = [torch.randn(3, 4) for _ in range(3)]
    for alpha in (1.0, 0.7, 0.0):
        out = _regmean(weights, [gram] * 3, alpha=alpha)
        assert torch.allclose(out, torch.stack(weights).mean(0), atol=1e-5)


def _fusionbench_regmean(weights, grams, ratio):
    """FusionBench's `merging_with_regmean_weights` for one weight, written from its code:
    G·(diag(1 − r) + r) (diagonal kept, off-diagonal ×r), summed, torch.inverse, times
    Σ G_i W_iᵀ, transposed back."""
    scaled = []
    for g in grams:
        mask = torch.diag(torch.ones(g.shape[0]) - ratio) + torch.full_like(g, ratio)
        scaled.append(g * mask)
    rhs = sum(g @ w.T for g, w in zip(scaled, weights, strict=True))
    return (torch.inverse(sum(scaled)) @ rhs).T


def test_parity_with_fusionbench_formula():
    torch.manual_seed(1)
    weights = [torch.randn(3, 4, dtype=torch.float64) for _ in range(2)]
    grams = []
    for _ in range(2):
        x = torch.randn(10, 4, dtype=torch.float64)
        grams.append(x.T @ x / 10)
    for ratio in (1.0, 0.6, 0.1):
        ours = _regmean([w.float() for w in weights], [g.float() for g in grams], alpha=ratio)
        theirs = _fusionbench_regmean(weights, grams, ratio)
        assert torch.allclose(ours.double(), theirs, atol=1e-5)


def test_linear_regressions_merge_to_the_joint_least_squares_fit():
    # For linear models, RegMean (α = 1, Grams summed over the data) is the least-squares
    # solution on the union of the data: Σ XᵢᵀXᵢ Wᵢᵀ = Σ XᵢᵀYᵢ at each model's optimum.
    torch.manual_seed(2)
    data = []
    models = []
    for shift in (0.0, 1.5):
        x = torch.randn(40, 3, dtype=torch.float64) + shift
        y = x @ torch.randn(3, 2, dtype=torch.float64) + 0.1 * torch.randn(40, 2).double()
        data.append((x, y))
        m = nn.Linear(3, 2, bias=False)
        with torch.no_grad():
            m.weight.copy_(torch.linalg.lstsq(x, y).solution.T)
        models.append(m)
    grams = [
        collect_gram(m, [x[:25].float(), x[25:].float()], reduction="sum")
        for m, (x, _) in zip(models, data, strict=True)
    ]
    assert set(grams[0]) == {"weight"}
    assert torch.allclose(grams[0]["weight"].double(), data[0][0].T @ data[0][0], rtol=1e-5)
    merged = merge_with_statistics("regmean", [m.state_dict() for m in models], grams, alpha=1.0)
    x_all = torch.cat([x for x, _ in data])
    y_all = torch.cat([y for _, y in data])
    joint = torch.linalg.lstsq(x_all, y_all).solution.T
    assert torch.allclose(merged["weight"].double(), joint, atol=1e-4)
    # The plain average is far from it (the check can fail).
    mean = (models[0].weight + models[1].weight).double() / 2
    assert not torch.allclose(mean.detach(), joint, atol=1e-2)


class _MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(3, 4)
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.up(x)))


def test_gram_mean_reduction_exclude_and_nonlinear_parameters_averaged(tmp_path):
    torch.manual_seed(3)
    nets = [_MLP(), _MLP()]
    xs = [torch.randn(2, 5, 3), torch.randn(3, 5, 3)]  # rows: every position of every example
    other = [torch.randn(4, 5, 3) * torch.tensor([1.0, 3.0, 0.5]) + 1]  # model 1's own data
    grams = [collect_gram(n, x, exclude=[r"^head$"]) for n, x in zip(nets, [xs, other])]
    rows = torch.cat([x.reshape(-1, 3) for x in xs])
    assert set(grams[0]) == {"up.weight"}
    assert torch.allclose(grams[0]["up.weight"], rows.T @ rows / rows.shape[0], atol=1e-6)
    save_statistics(grams[1], tmp_path / "g1.safetensors")
    assert torch.equal(
        load_statistics(tmp_path / "g1.safetensors")["up.weight"], grams[1]["up.weight"]
    )
    sds = [n.state_dict() for n in nets]
    merged = merge_with_statistics("regmean", sds, [grams[0], tmp_path / "g1.safetensors"])
    for name in ("up.bias", "norm.weight", "norm.bias", "head.weight", "head.bias"):
        assert torch.allclose(merged[name], (sds[0][name] + sds[1][name]) / 2)
    expected = _regmean([sds[0]["up.weight"], sds[1]["up.weight"]], [g["up.weight"] for g in grams])
    assert torch.allclose(merged["up.weight"], expected)
    assert not torch.allclose(merged["up.weight"], (sds[0]["up.weight"] + sds[1]["up.weight"]) / 2)


def test_hf_model_statistics_and_merge():
    from tests.tiny_hf import tiny_llama

    models = [tiny_llama(seed=s) for s in (0, 1)]
    batches = [{"input_ids": torch.randint(0, 64, (2, 6))} for _ in range(2)]
    grams = [collect_gram(m, batches, exclude=[r"lm_head"]) for m in models]
    assert "model.layers.0.self_attn.q_proj.weight" in grams[0]
    assert grams[0]["model.layers.0.mlp.down_proj.weight"].shape == (64, 64)
    assert "lm_head.weight" not in grams[0]
    merged = merge_with_statistics("regmean", [m.state_dict() for m in models], grams)
    q = "model.layers.1.self_attn.q_proj.weight"
    assert merged[q].shape == (32, 32) and bool(torch.isfinite(merged[q]).all())
    models[0].load_state_dict(merged)


def _two_linear():
    torch.manual_seed(4)
    sds = [nn.Linear(2, 2).state_dict() for _ in range(2)]
    grams = [{"weight": torch.eye(2)}, {"weight": 2 * torch.eye(2)}]
    return sds, grams


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        (lambda g: g[1].clear(), "statistics are empty"),
        (lambda g: g[1].update(weight=torch.eye(3)), "expected (2, 2)"),
        (lambda g: g[1].update(bias=torch.eye(2)), "2-D linear weights"),
        (lambda g: g[1].update(nope=torch.eye(2)), "names no floating tensor"),
        (lambda g: g[0].update(weight=torch.tensor([[1.0, float("nan")], [0, 1]])), "not finite"),
        (
            lambda g: (
                g[0].update(weight=torch.zeros(2, 2)) or g[1].update(weight=torch.zeros(2, 2))
            ),
            "singular",
        ),
        (lambda g: g.pop(), "1 statistics for 2 models"),
    ],
)
def test_bad_statistics_are_clear_errors(change, fragment):
    sds, grams = _two_linear()
    change(grams)
    with pytest.raises(MergeValidationError, match=None) as e:
        merge_with_statistics("regmean", sds, grams)
    assert fragment in str(e.value)


def test_missing_gram_for_one_model_and_missing_statistics():
    sds, grams = _two_linear()
    grams[1] = {"bias": torch.ones(2)}  # a Fisher-like dict: rejected as a Gram
    with pytest.raises(MergeValidationError, match="2-D linear weights"):
        merge_with_statistics("regmean", sds, grams)
    with pytest.raises(MergeValidationError, match="models \\[1\\] have no Gram"):
        _regmean([torch.eye(2), torch.eye(2)], [torch.eye(2), None])
    with pytest.raises(MergeValidationError, match="needs gram statistics"):
        get_method("regmean")(None, [torch.eye(2), torch.eye(2)])
    with pytest.raises(MergeValidationError, match="'alpha'"):
        merge_with_statistics("regmean", sds, grams, alpha=1.5)
    with pytest.raises(MergeValidationError, match="does not use data statistics"):
        merge_with_statistics("linear", sds, grams)
