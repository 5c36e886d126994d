"""AdaMerging: hand-computed steps on a one-weight linear classifier, the shapes and
columns of λ, clamping, determinism, AdaMerging++'s TIES vectors (against splice's TIES
and a re-derivation of the paper's ``ties_merging_split``), and the errors before training."""

from __future__ import annotations

import math

import pytest
import torch

from splice.errors import SpliceError
from splice.merge import get_method
from splice.train.adamerging import adamerging, entropy, ties_task_vectors

# Two classes, one input feature: logits z = W x with W (2 x 1). θ0 = 0, τ1 = [[2], [0]],
# τ2 = [[0], [1]], x = 1. At λ = (0.3, 0.3): z = (2 λ1, λ2) = (0.6, 0.3), d = z1 − z2 = 0.3.
# For two classes H = −p ln p − q ln q with p = σ(d), and dH/dd = −p q d (ln(p/q) = d),
# so with p = σ(0.3) = 0.5744425, p q = 0.2444583:
#   H = 0.6820225,  dH/dd = −0.0733375,  dH/dλ1 = 2 dH/dd = −0.1466750,  dH/dλ2 = +0.0733375.
H0 = 0.6820225
GRAD = (-0.1466750, 0.0733375)
BASE = {"w": torch.zeros(2, 1)}
EXPERTS = [{"w": torch.tensor([[2.0], [0.0]])}, {"w": torch.tensor([[0.0], [1.0]])}]
X = torch.ones(1, 1)


def linear(params, task, x):
    return x @ params["w"].T


def test_entropy_of_two_classes_by_hand():
    assert float(entropy(torch.tensor([[0.6, 0.3]]))) == pytest.approx(H0, abs=1e-6)
    # the mean over rows; a uniform row has entropy ln C
    two = torch.tensor([[0.6, 0.3], [0.0, 0.0]])
    assert float(entropy(two)) == pytest.approx((H0 + math.log(2)) / 2, abs=1e-6)


def test_one_gradient_step_by_hand():
    r = adamerging(
        BASE, EXPERTS, [[X], [X]], linear, granularity="task", optimizer="sgd", lr=1.0,
        steps=1, batches_per_step=1, clamp=None,
    )  # fmt: skip
    # two tasks, each through the same head here: the loss is 2 H, the gradient 2 ∇H
    assert r.losses == pytest.approx((2 * H0,), abs=1e-6)
    want = [0.3 - 2 * g for g in GRAD]
    assert r.coefficients.tolist() == pytest.approx(want, abs=1e-6)
    assert r.layers == ("w",)
    # the merged state is θ0 + Σ λ_k τ_k with the learned λ
    assert r.state["w"].flatten().tolist() == pytest.approx([2 * want[0], want[1]], abs=1e-6)


def test_heads_batches_and_tasks_are_summed():
    """Task 1 reads the classes swapped (its own head); entropy is symmetric, so each task
    adds H; two batches per task per step (the paper's) add it again: loss 4 H."""

    def heads(params, task, x):
        z = x @ params["w"].T
        return z if task == 0 else z.flip(-1)

    r = adamerging(
        BASE, EXPERTS, [[X], [X]], heads, granularity="task", optimizer="sgd", lr=0.5,
        steps=1, batches_per_step=2, clamp=None,
    )  # fmt: skip
    assert r.losses == pytest.approx((4 * H0,), abs=1e-6)
    assert r.coefficients.tolist() == pytest.approx([0.3 - 0.5 * 4 * g for g in GRAD], abs=1e-6)


def test_first_adam_step_moves_each_coefficient_by_lr_against_its_gradient():
    r = adamerging(BASE, EXPERTS, [[X], [X]], linear, granularity="task", steps=1)
    # Adam's first step is lr · g / (|g| + 1e-8): 1e-3 against the gradient's sign
    assert r.coefficients.tolist() == pytest.approx([0.301, 0.299], abs=1e-7)


def test_layer_wise_has_a_column_per_tensor_and_unused_tensors_keep_init():
    base = {**BASE, "u": torch.zeros(3), "step": torch.tensor(7)}
    experts = [{**e, "u": torch.full((3,), float(k + 1)), "step": torch.tensor(9)}
               for k, e in enumerate(EXPERTS)]  # fmt: skip
    r = adamerging(base, experts, [[X], [X]], linear, granularity="layer", steps=3)
    assert r.layers == ("w", "u")  # floating tensors only, in state order
    assert r.coefficients.shape == (2, 2)
    # "u" does not reach the logits: zero gradient, Adam leaves its λ at the init
    assert torch.equal(r.coefficients[:, 1], torch.full((2,), 0.3))
    assert r.coefficients[0, 0] > 0.3 > r.coefficients[1, 0]
    assert r.state["u"].tolist() == pytest.approx([0.3 * 1 + 0.3 * 2] * 3)
    assert int(r.state["step"]) == 7  # an integer buffer comes from the base
    task = adamerging(base, experts, [[X], [X]], linear, granularity="task", steps=3)
    assert task.coefficients.shape == (2,)
    # with one tensor that matters, the layer-wise column of "w" moves as task-wise λ
    assert r.coefficients[:, 0].tolist() == pytest.approx(task.coefficients.tolist(), abs=1e-7)


def test_clamping_to_the_unit_interval():
    kw = dict(granularity="task", optimizer="sgd", lr=1.0, steps=1, batches_per_step=1)
    r = adamerging(BASE, EXPERTS, [[X], [X]], linear, init=0.9, **kw)
    # λ1's raw value 0.9 + 2 · 0.147 passes 1: the coefficient used is 1
    assert r.coefficients[0] == 1.0
    free = adamerging(BASE, EXPERTS, [[X], [X]], linear, init=0.9, clamp=None, **kw)
    assert free.coefficients[0] > 1.0
    assert r.state["w"][0, 0] == pytest.approx(2.0)


def test_a_seed_fixes_the_batch_order():
    torch.manual_seed(0)
    batches = [[torch.randn(4, 1) for _ in range(3)] for _ in range(2)]
    kw = dict(granularity="layer", steps=4, batches_per_step=1)
    a = adamerging(BASE, EXPERTS, batches, linear, seed=0, **kw)
    b = adamerging(BASE, EXPERTS, batches, linear, seed=0, **kw)
    c = adamerging(BASE, EXPERTS, batches, linear, seed=1, **kw)
    assert torch.equal(a.coefficients, b.coefficients) and a.losses == b.losses
    assert a.losses[0] != c.losses[0]  # another first batch


def _paper_ties_split(flat: torch.Tensor, k_percent: float) -> torch.Tensor:
    """The paper's ``ties_merging_split`` (EnnengYang/AdaMerging, ties_merging_utils.py),
    re-derived: per row keep |x| >= the (d − int(d·K))-th smallest |x|, elect
    sign(Σ rows) (zeros: the sign of the total), keep the entries of that sign."""
    d = flat.shape[1]
    kth = flat.abs().kthvalue(d - int(d * k_percent), dim=1, keepdim=True).values
    trimmed = flat * (flat.abs() >= kth)
    sign = torch.sign(trimmed.sum(0))
    sign[sign == 0] = torch.sign(sign.sum())
    keep = torch.where(sign > 0, trimmed > 0, trimmed < 0)
    return trimmed * keep


def test_ties_vectors_match_the_papers_split():
    # N = 28 entries: the paper keeps int(0.2 · 28) + 1 = 6, splice round(5.6) = 6
    torch.manual_seed(3)
    vectors = [{"a": torch.randn(4, 5), "b": torch.randn(8)} for _ in range(3)]
    ours = ties_task_vectors(vectors, 0.2)
    flat = torch.stack([torch.cat([v["a"].flatten(), v["b"]]) for v in vectors])
    paper = _paper_ties_split(flat, 0.2)
    for k, v in enumerate(ours):
        assert torch.equal(torch.cat([v["a"].flatten(), v["b"]]), paper[k])
        assert int((v["a"] != 0).sum() + (v["b"] != 0).sum()) <= 6
    assert torch.equal(vectors[0]["b"], vectors[0]["b"].clone())  # inputs untouched


def test_ties_vectors_sum_to_splice_ties_with_disjoint_sum():
    torch.manual_seed(4)
    base = torch.randn(6, 7)
    thetas = [base + torch.randn(6, 7) for _ in range(3)]
    vectors = [{"w": t - base} for t in thetas]
    summed = sum(v["w"] for v in ties_task_vectors(vectors, 0.3))
    ties = get_method("ties")(
        base.clone(), [t.clone() for t in thetas], density=0.3, disjoint="sum", scope="tensor"
    )
    assert torch.allclose(base + summed, ties, atol=1e-6)


def test_adamerging_plus_plus_merges_the_ties_vectors():
    torch.manual_seed(5)
    base = {"w": torch.randn(2, 3)}
    experts = [{"w": base["w"] + torch.randn(2, 3)} for _ in range(2)]
    xs = [[torch.randn(4, 3)], [torch.randn(4, 3)]]
    r = adamerging(base, experts, xs, linear, granularity="task", ties_density=0.5, steps=2)
    ties = ties_task_vectors([{"w": e["w"] - base["w"]} for e in experts], 0.5)
    want = base["w"] + sum(lam * v["w"] for lam, v in zip(r.coefficients, ties, strict=True))
    assert torch.allclose(r.state["w"], want, atol=1e-6)
    plain = adamerging(base, experts, xs, linear, granularity="task", steps=2)
    assert not torch.allclose(plain.state["w"], r.state["w"])


def _never(params, task, batch):
    raise AssertionError("forward ran: the error must come before any training")


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"batches": []}, "batches for every task: 0 batch lists for 2"),
        ({"batches": [[X], []]}, "task 1 has no unlabeled batches"),
        ({"batches": [[X], [torch.zeros(0, 1)]]}, "task 1: batch 0 is empty"),
        ({"batches": [[X], [{"input_ids": torch.zeros(0, 3, dtype=torch.long)}]]}, "empty"),
        ({"batches": [[X], [{"text": []}]]}, "task 1: batch 0 is empty"),
        ({"steps": 0}, "steps must be a positive integer"),
        ({"steps": -3}, "steps must be a positive integer"),
        ({"batches_per_step": 0}, "batches_per_step must be positive"),
        ({"lr": 0.0}, "lr must be a positive"),
        ({"lr": float("nan")}, "lr must be a positive"),
        ({"init": float("inf")}, "init must be finite"),
        ({"granularity": "block"}, "granularity must be"),
        ({"clamp": (1.0, 0.0)}, "clamp must be"),
        ({"ties_density": 0.0}, "ties_density must be in"),
        ({"experts": []}, "at least one expert"),
        ({"experts": [EXPERTS[0], {"w": torch.zeros(1, 2)}]}, "expert 1 has shape"),
        ({"experts": [EXPERTS[0], {"v": torch.zeros(2, 1)}]}, "expert 1 has no tensor 'w'"),
    ],
)
def test_errors_before_any_training(change, match):
    kw = {"experts": EXPERTS, "batches": [[X], [X]], **change}
    experts, batches = kw.pop("experts"), kw.pop("batches")
    with pytest.raises(SpliceError, match=match):
        adamerging(BASE, experts, batches, _never, **kw)


def test_logits_must_be_two_dimensional():
    with pytest.raises(SpliceError, match=r"logits of shape \[batch, classes\]"):
        adamerging(BASE, EXPERTS, [[X], [X]], lambda p, k, x: (x @ p["w"].T)[0], steps=1)


def _paper_layer_wise(base, experts, batches, forward, steps):
    """The paper's layer-wise loop (main_layer_wise_adamerging.py), re-derived: a λ row
    per tensor for [θ0, τ_1..τ_K] with the base's fixed at 1 and the rest clamp(raw, 0, 1),
    raw = 0.3; per step, for each task the mean entropy of two batches is added to the
    loss (``if i > 0: break``), one backward, one Adam step (lr 1e-3, betas 0.9/0.999)."""
    names = list(base)
    paramslist = [tuple(base[n] for n in names)]
    paramslist += [tuple(e[n] - base[n] for n in names) for e in experts]
    raw = torch.nn.Parameter(torch.ones(len(names), len(experts)) * 0.3)
    opt = torch.optim.Adam([raw], lr=1e-3, betas=(0.9, 0.999), weight_decay=0.0)
    for _ in range(steps):
        lambdas = torch.cat((torch.ones(len(names), 1), raw.clamp(0.0, 1.0)), 1)
        params = tuple(
            sum(pi * li for pi, li in zip(p, lambdas[j], strict=True))
            for j, p in enumerate(zip(*paramslist, strict=True))
        )
        merged = dict(zip(names, params, strict=True))
        losses = 0.0
        for k, task_batches in enumerate(batches):
            for x in task_batches[:2]:
                z = forward(merged, k, x)
                losses = losses + (-(z.softmax(1) * z.log_softmax(1)).sum(1)).mean(0)
        opt.zero_grad()
        losses.backward()
        opt.step()
    return raw.detach().clamp(0.0, 1.0).T  # [K, L], as splice returns it


def test_layer_wise_parity_with_the_papers_loop():
    torch.manual_seed(6)
    base = {"w": torch.randn(3, 4), "b": torch.randn(3)}
    experts = [{n: t + torch.randn_like(t) for n, t in base.items()} for _ in range(3)]
    batches = [[torch.randn(5, 4), torch.randn(5, 4)] for _ in range(3)]

    def affine(params, task, x):
        return x @ params["w"].T + params["b"]

    ours = adamerging(base, experts, batches, affine, granularity="layer", steps=25)
    paper = _paper_layer_wise(base, experts, batches, affine, steps=25)
    assert ours.layers == ("w", "b")
    assert torch.allclose(ours.coefficients, paper, atol=1e-6)
    assert not torch.allclose(paper, torch.full_like(paper, 0.3), atol=5e-3)  # it moved


def test_a_tensor_no_expert_changes_gets_no_gradient_and_keeps_parity():
    """As a LoRA expert leaves all but its target modules at the base: the bias "b" is the
    same in every expert, so the forward sees it without ``requires_grad`` (no backward
    work for it), its λ stays at the init, and the rest moves as the paper's loop moves it
    (which computes the bias's zero gradient)."""
    torch.manual_seed(7)
    base = {"w": torch.randn(3, 4), "b": torch.randn(3)}
    experts = [{"w": base["w"] + torch.randn(3, 4), "b": base["b"].clone()} for _ in range(3)]
    batches = [[torch.randn(5, 4), torch.randn(5, 4)] for _ in range(3)]
    seen = []

    def affine(params, task, x):
        seen.append((params["w"].requires_grad, params["b"].requires_grad))
        return x @ params["w"].T + params["b"]

    ours = adamerging(base, experts, batches, affine, granularity="layer", steps=25)
    paper = _paper_layer_wise(base, experts, batches, affine, steps=25)
    assert set(seen[: 25 * 3 * 2]) == {(True, False)}
    assert torch.allclose(ours.coefficients, paper, atol=1e-6)
    assert torch.equal(ours.coefficients[:, 1], torch.full((3,), 0.3))
    assert torch.equal(ours.state["b"], base["b"])
    assert ours.state["b"].data_ptr() != base["b"].data_ptr()  # a copy, not the caller's
