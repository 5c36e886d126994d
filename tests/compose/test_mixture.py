"""Routed mixture (`splice.compose.mixture`): forward values by hand on one nn.Linear with two
LoRA experts (dense, top-1, top-2; token and sequence gates), the load-balancing loss by
hand, gradients to the gate only, and one-line errors."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from splice.adapters import AdapterModel, make_config
from splice.compose.balance import load_balancing_loss
from splice.compose.gate import route
from splice.compose.mixture import Mixture
from splice.compose.mixture_config import MixtureError

W = torch.tensor([[1.0, 0.0, 2.0], [0.0, -1.0, 1.0]])  # base weight [out 2, in 3]
BIAS = torch.tensor([0.5, -0.5])
# LoRA r=1, lora_alpha=2 -> scaling 2: ΔW = 2 · B A
A1, B1 = torch.tensor([[1.0, 0.0, 0.0]]), torch.tensor([[1.0], [0.0]])  # ΔW1 = [[2,0,0],[0,0,0]]
A2, B2 = torch.tensor([[0.0, 1.0, 0.0]]), torch.tensor([[0.0], [1.0]])  # ΔW2 = [[0,0,0],[0,2,0]]
D1 = 2 * B1 @ A1
D2 = 2 * B2 @ A2
X = torch.tensor([[[1.0, 2.0, 3.0], [-1.0, 0.5, 2.0]]])  # [batch 1, tokens 2, in 3]


class OneLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(3, 2)
        with torch.no_grad():
            self.proj.weight.copy_(W)
            self.proj.bias.copy_(BIAS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def two_experts() -> AdapterModel:
    am = AdapterModel(OneLinear())
    for name, (a, b) in {"one": (A1, B1), "two": (A2, B2)}.items():
        config = {"r": 1, "lora_alpha": 2, "target_modules": ["proj"]}
        am.add_adapter(name, make_config("lora", config))
        module = dict(am.named_adapter_modules(name))["proj"]
        with torch.no_grad():
            module.lora_A.weight.copy_(a)
            module.lora_B.weight.copy_(b)
    return am


def set_token_gate(mix: Mixture, weight: torch.Tensor) -> None:
    with torch.no_grad():
        mix.gates["proj"].weight.copy_(weight)


G = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])  # token gate logits z = (x0, x2)


def expected(weights: torch.Tensor) -> torch.Tensor:
    """y = W x + b + Σ_i g_i ΔW_i x, per token, g [tokens, 2]."""
    base = X[0] @ W.T + BIAS
    return base + weights[:, :1] * (X[0] @ D1.T) + weights[:, 1:] * (X[0] @ D2.T)


def test_token_gate_dense_top1_top2_by_hand():
    am = two_experts()
    # logits per token: (1, 3) and (-1, 2)
    p = torch.softmax(torch.tensor([[1.0, 3.0], [-1.0, 2.0]]), dim=-1)
    for top_k, g in [
        (None, p),
        (1, torch.tensor([[0.0, 1.0], [0.0, 1.0]])),  # the larger of the two, renormalized
        (2, p),  # top-2 of two experts: all kept, renormalized = softmax
    ]:
        mix = Mixture(am, ["one", "two"], gate="token", top_k=top_k)
        set_token_gate(mix, G)
        out = mix(X)
        torch.testing.assert_close(out[0], expected(g))
        torch.testing.assert_close(mix.last_routing["proj"].weights[0], g)
    # values the formula gives: token 0, dense: p=(0.1192, 0.8808); ΔW1 x=(2,0), ΔW2 x=(0,4)
    mix = Mixture(am, ["one", "two"], gate="token")
    set_token_gate(mix, G)
    y0 = mix(X)[0, 0]
    torch.testing.assert_close(y0, torch.tensor([7.5 + 2 * 0.11920292, 0.5 + 4 * 0.88079708]))


def test_top1_picks_per_token_and_skips_nothing_chosen():
    am = two_experts()
    mix = Mixture(am, ["one", "two"], gate="token", top_k=1)
    set_token_gate(mix, torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))  # z = (x0, x1)
    # token 0: z=(1, 2) -> expert two; token 1: z=(-1, 0.5) -> expert two
    torch.testing.assert_close(mix(X)[0], expected(torch.tensor([[0.0, 1.0], [0.0, 1.0]])))
    set_token_gate(mix, torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0]]))  # z = (x2, x1)
    # token 0: (3, 2) -> one; token 1: (2, 0.5) -> one
    torch.testing.assert_close(mix(X)[0], expected(torch.tensor([[1.0, 0.0], [1.0, 0.0]])))


def test_sequence_gate_one_weight_vector_per_row():
    am = two_experts()
    x = torch.cat([X, X.flip(1)])  # two rows
    feats = torch.tensor([[0.0, 1.0], [2.0, 0.0]])  # pooled features, hidden 2
    mix = Mixture(am, ["one", "two"], gate="sequence", hidden_size=2)
    with torch.no_grad():
        mix.gates["sequence"].weight.copy_(torch.eye(2))
        mix.gates["sequence"].bias.copy_(torch.tensor([0.0, 0.5]))
    out = mix(x, sequence_features=feats)
    g = torch.softmax(torch.tensor([[0.0, 1.5], [2.0, 0.5]]), dim=-1)  # z = h̄ + b per row
    base = x @ W.T + BIAS
    want = base + g[:, None, :1] * (x @ D1.T) + g[:, None, 1:] * (x @ D2.T)
    torch.testing.assert_close(out, want)
    top1 = Mixture(am, ["one", "two"], gate="sequence", top_k=1, hidden_size=2)
    top1.gates.load_state_dict(mix.gates.state_dict())
    out = top1(x, sequence_features=feats)
    torch.testing.assert_close(out[0], (base + x @ D2.T)[0])  # row 0 -> two
    torch.testing.assert_close(out[1], (base + x @ D1.T)[1])  # row 1 -> one


def test_route_renormalizes_top_k_and_ties_go_to_lower_index():
    r = route(torch.tensor([[0.0, 1.0, 2.0], [1.0, 1.0, 0.0]]), 2)
    p = torch.softmax(torch.tensor([0.0, 1.0, 2.0]), 0)
    torch.testing.assert_close(r.weights[0], torch.cat([torch.zeros(1), p[1:] / p[1:].sum()]))
    torch.testing.assert_close(r.weights[1], torch.tensor([0.5, 0.5, 0.0]))
    r1 = route(torch.tensor([[1.0, 1.0, 0.0]]), 1)
    torch.testing.assert_close(r1.weights[0], torch.tensor([1.0, 0.0, 0.0]))


def test_load_balancing_loss_by_hand_and_minimal_when_uniform():
    probs = torch.tensor([[0.8, 0.2], [0.6, 0.4], [0.3, 0.7]])
    chosen = torch.nn.functional.one_hot(probs.argmax(-1, keepdim=True), 2).float()  # 0, 0, 1
    # f = (2/3, 1/3), P = (1.7/3, 1.3/3): L = 2 · (2/3 · 1.7/3 + 1/3 · 1.3/3) = 9.4 / 9
    torch.testing.assert_close(load_balancing_loss(probs, chosen), torch.tensor(9.4 / 9))
    # the padded position (mask 0) is left out: f = (1/2, 1/2), P = (0.55, 0.45): L = 1
    mask = torch.tensor([0.0, 1.0, 1.0])
    torch.testing.assert_close(load_balancing_loss(probs, chosen, mask), torch.tensor(1.0))
    # uniform routing gives k (1 for top-1, 2 for top-2). When every position routes alike
    # (p shared, so the same top-k set K), L = N · Σ_{i∈K} p_i >= k, with equality iff uniform
    g = torch.Generator().manual_seed(0)
    for k in (1, 2):
        uniform = route(torch.zeros(16, 4), k)
        torch.testing.assert_close(
            load_balancing_loss(uniform.probs, uniform.chosen), torch.tensor(float(k))
        )
        for _ in range(20):
            r = route(torch.randn(1, 4, generator=g).expand(16, 4), k)
            kept = r.probs[0].topk(k).values.sum()
            torch.testing.assert_close(load_balancing_loss(r.probs, r.chosen), 4 * kept)
            assert load_balancing_loss(r.probs, r.chosen) > k
        # a balanced dispatch (f_i = k/N) gives k whatever P is: the loss pushes f, via P
        r = route(torch.eye(4) * 5, k)
        torch.testing.assert_close(load_balancing_loss(r.probs, r.chosen), torch.tensor(float(k)))
    # everything to one confident expert: L -> N · k
    r = route(torch.tensor([[20.0, 0.0, 0.0, 0.0]] * 8), 1)
    torch.testing.assert_close(load_balancing_loss(r.probs, r.chosen), torch.tensor(4.0))


def test_balance_loss_value_and_gradients_reach_only_the_gate():
    am = two_experts()
    mix = Mixture(am, ["one", "two"], gate="token", balance_coef=0.5)
    set_token_gate(mix, G)
    mix.train()
    out = mix(X)
    routing = mix.last_routing["proj"]
    # dense gate: f counts each token's argmax (two, two), P the mean softmax
    p = torch.softmax(torch.tensor([[1.0, 3.0], [-1.0, 2.0]]), dim=-1)
    torch.testing.assert_close(mix.balance_loss(), 2 * p[:, 1].mean())
    torch.testing.assert_close(routing.probs[0], p)
    assert [n for n, p in mix.named_parameters() if p.requires_grad] == ["gates.proj.weight"]
    (out.sum() + mix.balance_loss()).backward()
    assert mix.gates["proj"].weight.grad.abs().sum() > 0
    for name, param in am.named_parameters():
        assert param.grad is None, name


def test_top1_renormalized_gets_no_task_gradient_unless_renormalize_false():
    am = two_experts()
    grads = {}
    for renormalize in (True, False):
        mix = Mixture(am, ["one", "two"], top_k=1, renormalize=renormalize)
        set_token_gate(mix, G)
        mix(X).sum().backward()
        grads[renormalize] = mix.gates["proj"].weight.grad.abs().sum()
        if not renormalize:  # g = p of the chosen expert (Switch / X-LoRA)
            p = torch.softmax(torch.tensor([[1.0, 3.0], [-1.0, 2.0]]), dim=-1)
            g = torch.stack([torch.zeros(2), p[:, 1]], dim=-1)
            torch.testing.assert_close(mix(X)[0].detach(), expected(g))
    assert grads[True] == 0 and grads[False] > 0


class WithLoss(nn.Module):
    """OneLinear whose output carries a loss (as HF outputs do)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = OneLinear().proj

    def forward(self, x: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(loss=self.proj(x).sum())


def test_training_loss_includes_the_balance_term_eval_does_not():
    am = AdapterModel(WithLoss())
    for name in ("one", "two"):
        am.add_adapter(name, make_config("lora", {"r": 1, "target_modules": ["proj"]}))
    mix = Mixture(am, ["one", "two"], top_k=1, balance_coef=0.25)
    mix.eval()
    plain = mix(X).loss
    mix.train()
    trained = mix(X).loss
    torch.testing.assert_close(trained, plain + 0.25 * mix.balance_loss())


def test_errors_are_one_line():
    am = two_experts()
    cases = [
        (lambda: Mixture(am, ["one", "tow"]), "unknown expert 'tow' (did you mean 'two'?)"),
        (lambda: Mixture(am, ["one"]), "at least two experts"),
        (lambda: Mixture(am, ["one", "one"]), "named twice"),
        (lambda: Mixture(am, ["one", "two"], top_k=3), "top_k=3 but the mixture has 2 experts"),
        (lambda: Mixture(am, ["one", "two"], gate="tokens"), "gate"),
        (lambda: Mixture(am, ["one", "two"], gate="sequence"), "hidden_size="),
    ]
    for make, message in cases:
        with pytest.raises((MixtureError, ValueError)) as e:
            make()
        assert message in str(e.value)
    other = AdapterModel(TwoLinear())
    other.add_adapter("one", make_config("lora", {"r": 1, "target_modules": ["a"]}))
    other.add_adapter("two", make_config("lora", {"r": 1, "target_modules": ["b"]}))
    with pytest.raises(MixtureError, match=r"different layers: 'one' adapts a, 'two' does not"):
        Mixture(other, ["one", "two"])


class TwoLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x))


def test_folded_expert_refused_and_model_unchanged_after_forward():
    am = two_experts()
    mix = Mixture(am, ["one", "two"])
    with torch.no_grad():
        before = am(X)
        mix(X)
        torch.testing.assert_close(am(X), before)  # routers removed, active restored
    am.fold("one")
    with pytest.raises(MixtureError, match="expert 'one' is folded"):
        mix(X)


def test_any_layer_adapter_is_an_expert_its_forward_minus_the_base():
    am = AdapterModel(OneLinear())
    am.add_adapter("lora", make_config("lora", {"r": 1, "target_modules": ["proj"]}))
    am.add_adapter(
        "ia3", make_config("ia3", {"target_modules": ["proj"], "feedforward_modules": []})
    )
    am.add_adapter(
        "dora", make_config("lora", {"r": 1, "use_dora": True, "target_modules": ["proj"]})
    )
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in am.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g))
    names = ["lora", "ia3", "dora"]
    mix = Mixture(am, names)
    with torch.no_grad():
        mix.gates["proj"].weight.copy_(torch.randn(3, 3, generator=g))
        out = mix(X)
        weights = mix.last_routing["proj"].weights
        with am.disabled():
            base = am(X)
        want = base.clone()
        for i, name in enumerate(names):
            am.set_active([name])
            want += weights[..., i : i + 1] * (am(X) - base)
    torch.testing.assert_close(out, want)
