"""FW-Merging on constructed least-squares tasks whose relevant checkpoints are known:
iterates computed by hand (hard and soft), tensor-wise picks, irrelevant models ignored."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from splice.errors import MergeValidationError
from splice.merge.frank_wolfe import fw_merge

D = 4
E = torch.eye(D, dtype=torch.float32)


def _model():
    return nn.Linear(D, 1, bias=False)


def _task(w_star):
    """L(w) = ½ mean_rows (x·w − x·w*)² with X = I: gradient (w − w*) / D."""

    def loss(model):
        return 0.5 * (model(E) - E @ w_star.unsqueeze(1)).square().mean()

    return loss


def _sd(w):
    return {"weight": w.reshape(1, D).clone()}


W1, W2 = 2 * E[0], 2 * E[1]
BASE = _sd(torch.zeros(D))


def test_hard_iterates_by_hand():
    # pool: two relevant experts, then irrelevant ones (opposite, orthogonal)
    pool = [_sd(W1), _sd(W2), _sd(-E[0]), _sd(3 * E[3])]
    r = fw_merge(_model(), BASE, pool, [_task(W1), _task(W2)], iterations=2)
    # t=0: g ∝ −(W1 + W2): cos −1/√2 for W1 and W2 (tie: the first), +1/√2 for −e1, 0 else;
    #      γ0 = 1: θ1 = W1
    # t=1: g ∝ (θ1 − W1) + (θ1 − W2) = W1 − W2: W2 has cos −1/√2; γ1 = 2/3:
    #      θ2 = W1 + 2/3 (W2 − W1) = [2/3, 4/3, 0, 0]
    assert r.picks == [[0], [1]]
    assert torch.allclose(r.state_dict["weight"], torch.tensor([[2 / 3, 4 / 3, 0.0, 0.0]]))
    assert r.losses[0] == pytest.approx(0.5 * (4 / 4 + 4 / 4) / 2)  # L(0): each task ½·4/4


def test_soft_iterates_by_hand():
    pool = [_sd(W1), _sd(W2), _sd(-E[0]), _sd(E[2])]
    r = fw_merge(_model(), BASE, pool, [_task(W1), _task(W2)], variant="soft", iterations=2)
    # t=0: task 1 picks W1, task 2 picks W2; θ1 = 0 + 0.3 · 1 · (W1 + W2) = [.6, .6, 0, 0]
    # t=1: the same picks; θ2 = θ1 + 0.3 · 2/3 · ((W1 − θ1) + (W2 − θ1)) = [.76, .76, 0, 0]
    assert r.picks == [[0, 1], [0, 1]]
    assert torch.allclose(r.state_dict["weight"], torch.tensor([[0.76, 0.76, 0.0, 0.0]]))


def test_tensor_granularity_picks_per_tensor():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Parameter(torch.zeros(2))
            self.b = nn.Parameter(torch.zeros(2))

    a_star, b_star = torch.tensor([1.0, 2.0]), torch.tensor([-3.0, 1.0])

    def loss(m):
        return 0.5 * ((m.a - a_star).square().sum() + (m.b - b_star).square().sum())

    base = {"a": torch.zeros(2), "b": torch.zeros(2)}
    pool = [{"a": a_star, "b": -b_star}, {"a": -a_star, "b": b_star}]
    whole = fw_merge(Two(), base, pool, [loss], iterations=1)
    per_tensor = fw_merge(Two(), base, pool, [loss], iterations=1, granularity="tensor")
    # one step with γ0 = 1 lands on the picks: per tensor, model 0's a and model 1's b
    assert torch.equal(per_tensor.state_dict["a"], a_star)
    assert torch.equal(per_tensor.state_dict["b"], b_star)
    assert not torch.equal(whole.state_dict["b"], b_star)


def test_irrelevant_models_are_never_picked_and_do_not_hurt():
    g = torch.Generator().manual_seed(0)
    relevant = [_sd(W1), _sd(W2)]
    # other tasks' experts: moved only along the directions these tasks do not reward
    irrelevant = [_sd(torch.randn(D, generator=g) * 3 * (E[2] + E[3])) for _ in range(8)]
    tasks = [_task(W1), _task(W2)]
    best = 0.5 * (W1 + W2)  # the minimizer of the mean loss

    def loss_of(sd):
        m = _model()
        m.load_state_dict(sd)
        with torch.no_grad():
            return float(sum(t(m) for t in tasks)) / 2

    small = fw_merge(_model(), BASE, relevant, tasks, iterations=20)
    big = fw_merge(_model(), BASE, relevant + irrelevant, tasks, iterations=20)
    assert all(p[0] in (0, 1, len(relevant) + len(irrelevant)) for p in big.picks), big.picks
    assert loss_of(big.state_dict) == pytest.approx(loss_of(small.state_dict))
    optimum = loss_of(_sd(best))  # 0.25: the two tasks conflict
    assert loss_of(big.state_dict) < optimum + 0.01 < loss_of(BASE)
    assert torch.allclose(big.state_dict["weight"][0], best, atol=0.2)
    # task arithmetic over the same pool is pulled off by the irrelevant models
    ta = {"weight": sum(sd["weight"] for sd in relevant + irrelevant) / 10}
    assert loss_of(ta) > 2 * loss_of(big.state_dict)


def test_inner_oracle_is_textbook_frank_wolfe():
    pool = [_sd(W1), _sd(W2), _sd(10 * E[0])]
    # ⟨g, s − θ⟩ at θ = 0, g ∝ −(W1 + W2)/2: W1 → −4, W2 → −4, 10e1 → −20: the far one wins
    r = fw_merge(_model(), BASE, pool, [_task(W1), _task(W2)], iterations=1, oracle="inner")
    assert r.picks == [[2]]
    r = fw_merge(_model(), BASE, pool, [_task(W1), _task(W2)], iterations=1)
    assert r.picks == [[0]]  # cosine: W1 and 10e1 tie at −1/√2; the first


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"iterations": 0}, "iterations"),
        ({"variant": "medium"}, "variant"),
        ({"step_size": 0.0}, "step_size"),
        ({"names": ["nope"]}, "not a parameter"),
    ],
)
def test_errors(kwargs, message):
    with pytest.raises(MergeValidationError, match=message):
        fw_merge(_model(), BASE, [_sd(W1)], [_task(W1)], **kwargs)
    with pytest.raises(MergeValidationError, match="non-empty pool"):
        fw_merge(_model(), BASE, [], [_task(W1)])
    with pytest.raises(MergeValidationError, match="lacks"):
        fw_merge(_model(), BASE, [{"weight": torch.zeros(2, 2)}], [_task(W1)])
