"""LoraHub (Huang et al. 2023): composed factors by hand, the CMA-ES search on problems with a
known optimum, determinism, the written PEFT folder, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from splice.adapters import AdapterModel, LoraConfig, save_adapter
from splice.compose.lorahub import (
    LoraExperts,
    LoraHubError,
    compose_factors,
    lorahub,
    lorahub_search,
)
from splice.delta import LowRank
from splice.engine.cma_search import SearchError, cma_minimize
from splice.errors import SpliceError


def test_composed_factors_are_weighted_sums_of_a_and_of_scaled_b():
    e1 = LowRank(torch.tensor([[1.0], [0.0]]), torch.tensor([[1.0, 2.0]]), 2.0)  # s1 = 2
    e2 = LowRank(torch.tensor([[0.0], [1.0]]), torch.tensor([[0.0, 1.0]]), 1.0)
    out = compose_factors([e1, e2], [0.5, -1.0])
    # A = 0.5·[1, 2] − 1·[0, 1] = [0.5, 0];  B = 0.5·2·[1, 0] − 1·1·[0, 1] = [1, −1]
    torch.testing.assert_close(out.a, torch.tensor([[0.5, 0.0]]))
    torch.testing.assert_close(out.b, torch.tensor([[1.0], [-1.0]]))
    assert out.scaling == 1.0
    # ΔW = B A holds the cross terms: not the weighted sum of the experts' ΔW
    torch.testing.assert_close(out.b @ out.a, torch.tensor([[0.5, 0.0], [-0.5, 0.0]]))
    weighted_deltas = 0.5 * 2 * e1.b @ e1.a - 1.0 * e2.b @ e2.a  # [[1, 2], [0, −1]]
    assert not torch.allclose(out.b @ out.a, weighted_deltas)


def test_composition_is_even_in_the_weights():
    g = torch.Generator().manual_seed(0)
    experts = [LowRank(torch.randn(4, 2, generator=g), torch.randn(2, 3, generator=g), 0.5)]
    experts.append(LowRank(torch.randn(4, 2, generator=g), torch.randn(2, 3, generator=g), 0.5))
    plus, minus = compose_factors(experts, [0.3, -0.7]), compose_factors(experts, [-0.3, 0.7])
    torch.testing.assert_close(plus.b @ plus.a, minus.b @ minus.a)


# -- the CMA-ES search -------------------------------------------------------------------------


def _quadratic(target):
    return lambda x: float(sum((a - b) ** 2 for a, b in zip(x, target, strict=True)))


def test_cma_finds_a_known_minimum_inside_the_box_and_counts_the_budget():
    found = cma_minimize(_quadratic([0.6, -0.4, 1.1]), 3, budget=150, seed=1)
    assert len(found.evaluations) == 150
    np.testing.assert_allclose(found.best_x, [0.6, -0.4, 1.1], atol=0.05)
    assert found.best_value == min(v for _, v in found.evaluations)


def test_cma_stays_inside_the_bounds():
    found = cma_minimize(_quadratic([3.0, -3.0]), 2, budget=200, seed=0, bounds=(-1.5, 1.5))
    assert all(-1.5 <= v <= 1.5 for x, _ in found.evaluations for v in x)
    np.testing.assert_allclose(found.best_x, [1.5, -1.5], atol=0.05)


def test_cma_is_deterministic_given_the_seed_and_leaves_numpy_state_alone():
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    a = cma_minimize(_quadratic([0.2, 0.2]), 2, budget=30, seed=7)
    assert (np.random.get_state()[1] == before).all()
    b = cma_minimize(_quadratic([0.2, 0.2]), 2, budget=30, seed=7)
    c = cma_minimize(_quadratic([0.2, 0.2]), 2, budget=30, seed=8)
    assert a.evaluations == b.evaluations
    assert a.evaluations != c.evaluations


def test_cma_one_dimension_and_a_partial_last_generation():
    found = cma_minimize(_quadratic([0.5]), 1, budget=50, seed=0)  # popsize 4: 12 gens + 2
    assert len(found.evaluations) == 50
    assert abs(found.best_x[0] - 0.5) < 0.05


@pytest.mark.parametrize(
    "kw", [{"budget": 0}, {"budget": 5, "bounds": (1.0, 1.0)}, {"budget": 5, "sigma0": 0.0}]
)
def test_cma_bad_settings(kw):
    with pytest.raises(SearchError):
        cma_minimize(_quadratic([0.0]), 1, **kw)


# -- LoraHub on tiny models --------------------------------------------------------------------


class _MLP(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.up, self.down = nn.Linear(6, 8), nn.Linear(8, 4)

    def forward(self, x):
        return self.down(torch.tanh(self.up(x)))


def _experts(tmp_path, n=3, r=2, alphas=None):
    dirs = []
    for i in range(n):
        am = AdapterModel(_MLP())
        alpha = (alphas or [4] * n)[i]
        am.add_adapter("default", LoraConfig(r=r, lora_alpha=alpha, target_modules=["up", "down"]))
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for p in am.adapter_parameters("default"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        save_adapter(am, tmp_path / f"e{i}")
        dirs.append(tmp_path / f"e{i}")
    return dirs


def _outputs_of(adapter_dir, x):
    from splice.adapters import load_adapter_model

    am = load_adapter_model(_MLP(), adapter_dir)
    with torch.no_grad():
        return am(x)


def _mse(model, batch):
    out = model(batch["x"])
    return ((out - batch["labels"]) ** 2).sum(), out.numel()


def test_lorahub_finds_the_expert_whose_outputs_are_the_target(tmp_path):
    dirs = _experts(tmp_path, alphas=[4, 2, 8])  # different scales: folded into B
    x = torch.randn(16, 6, generator=torch.Generator().manual_seed(5))
    batch = {"x": x, "labels": _outputs_of(dirs[1], x)}
    result = lorahub_search(_MLP(), dirs, [batch], budget=240, seed=0, l1=0.0, loss_fn=_mse)
    # ΔW is even in w, so the optimum is ±e_2: |w| ≈ one-hot
    np.testing.assert_allclose(np.abs(result.weights), [0.0, 1.0, 0.0], atol=0.08)
    assert result.loss < 1e-3 * result.base_loss
    again = lorahub_search(_MLP(), dirs, [batch], budget=240, seed=0, l1=0.0, loss_fn=_mse)
    assert again.weights == result.weights


def test_the_search_adapter_is_removed_and_the_active_set_restored(tmp_path):
    dirs = _experts(tmp_path, n=2)
    am = AdapterModel(_MLP())
    am.add_adapter("mine", LoraConfig(r=1, target_modules=["up"]))
    x = torch.randn(4, 6)
    before = am(x)
    batch = {"x": x, "labels": torch.zeros(4, 4)}
    lorahub_search(am, dirs, [batch], budget=6, seed=0, loss_fn=_mse)
    assert list(am.configs) == ["mine"] and am.active == ["mine"]
    torch.testing.assert_close(am(x), before)


def test_objective_is_the_loss_plus_l1_times_the_mean_absolute_weight(tmp_path):
    dirs = _experts(tmp_path, n=2)
    x = torch.randn(4, 6)
    batch = {"x": x, "labels": torch.zeros(4, 4)}
    r = lorahub_search(_MLP(), dirs, [batch], budget=8, seed=3, l1=0.05, loss_fn=_mse)
    penalty = 0.05 * (abs(r.weights[0]) + abs(r.weights[1])) / 2
    assert r.objective == pytest.approx(r.loss + penalty, rel=1e-9)
    assert r.evaluations == 8


def test_lorahub_writes_a_peft_folder_with_the_composed_update(tmp_path):
    from peft import PeftModel

    from tiny_hf import tiny_llama

    dirs = []
    for i in range(2):
        am = AdapterModel(tiny_llama(max_position_embeddings=64).eval())
        am.add_adapter(
            "default", LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
        )
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for p in am.adapter_parameters("default"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        save_adapter(am, tmp_path / f"l{i}")
        dirs.append(tmp_path / f"l{i}")
    ids = torch.tensor([[1, 5, 9, 12, 3, 7], [1, 4, 4, 8, 2, 30]])
    labels = ids.clone()
    labels[:, :3] = -100  # the prompt
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    model = tiny_llama(max_position_embeddings=64).eval()
    r = lorahub(model, dirs, [batch], tmp_path / "out", budget=6, seed=0)
    meta_weights = json.loads(
        __import__("safetensors")
        .safe_open(str(tmp_path / "out/adapter_model.safetensors"), "pt")
        .metadata()["splice_lorahub"]
    )["weights"]
    assert list(meta_weights.values()) == r.weights

    # expected: each q/v weight + (Σ w s B)(Σ w A), by hand from the experts' files
    from safetensors.torch import load_file

    w = r.weights
    expected = tiny_llama(max_position_embeddings=64).eval()
    states = [load_file(str(d / "adapter_model.safetensors")) for d in dirs]
    with torch.no_grad():
        for name, module in expected.named_modules():
            if name.endswith(("q_proj", "v_proj")):
                key = f"base_model.model.{name}"
                a = sum(wi * s[f"{key}.lora_A.weight"] for wi, s in zip(w, states))
                b = sum(wi * 2.0 * s[f"{key}.lora_B.weight"] for wi, s in zip(w, states))
                module.weight += b @ a
        want = expected(input_ids=ids).logits
    peft_model = PeftModel.from_pretrained(
        tiny_llama(max_position_embeddings=64).eval(), tmp_path / "out"
    )
    with torch.no_grad():
        got = peft_model(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)

    # the reported loss is the mean target-token cross-entropy with that adapter
    with torch.no_grad():
        logits = peft_model(input_ids=ids).logits[:, :-1]
    ce = nn.functional.cross_entropy(logits.reshape(-1, 64), labels[:, 1:].reshape(-1))
    assert r.loss == pytest.approx(float(ce), rel=1e-5)


def test_errors(tmp_path):
    with pytest.raises(LoraHubError, match="at least one"):
        LoraExperts.load([])
    a = _experts(tmp_path / "a", n=1, r=2)
    b = _experts(tmp_path / "b", n=1, r=3)
    with pytest.raises(SpliceError, match="equal ranks"):
        LoraExperts.load([a[0], b[0]])
    with pytest.raises(LoraHubError, match="at least one example"):
        lorahub_search(_MLP(), a, [], budget=2, loss_fn=_mse)
    from tiny_hf import tiny_llama

    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(SpliceError, match="matched no module"):  # an MLP adapter on a Llama
        lorahub_search(tiny_llama(), a, [{"input_ids": ids, "labels": ids}], budget=2)


def test_an_adapter_of_another_width_is_a_clear_error(tmp_path):
    from tiny_hf import tiny_llama

    am = AdapterModel(tiny_llama())
    am.add_adapter("default", LoraConfig(r=2, target_modules=["q_proj"]))
    save_adapter(am, tmp_path / "narrow")
    ids = torch.tensor([[1, 2, 3]])
    wide = tiny_llama(hidden_size=48, intermediate_size=64)
    with pytest.raises(SpliceError, match=r"q_proj.*shape|shape.*q_proj"):
        lorahub_search(wide, [tmp_path / "narrow"], [{"input_ids": ids, "labels": ids}], budget=2)
    assert not any("lorahub" in n for n, _ in wide.named_modules())
