"""RegMean++: block l's Grams come from the merged blocks < l (checked by hand on a toy
stack), it equals RegMean with one block, and it runs through an HF Llama's blocks."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parents[1]))
from splice.errors import MergeValidationError
from splice.merge.data_merge import merge_with_statistics
from splice.merge.data_stats import collect_gram
from splice.merge.regmean_plusplus import find_block_list, regmean_plusplus
from tiny_hf import tiny_llama


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.fc = nn.Linear(d, d, bias=False)

    def forward(self, x):
        return torch.tanh(self.fc(x))


class Stack(nn.Module):
    def __init__(self, d: int, n: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Block(d) for _ in range(n))

    def forward(self, x):
        for block in self.layers:
            x = block(x)
        return x


def _stack(seed, d=3, n=2):
    torch.manual_seed(seed)
    return Stack(d, n).double()


def _data(seed, rows=6, d=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(rows, d, generator=g, dtype=torch.float64) for _ in range(2)]


def _closed_form(weights, grams, alpha):
    """Wᵀ = (Σ G̃_i)⁻¹ Σ G̃_i W_iᵀ, G̃ = α G + (1 − α) diag G."""
    tilde = [alpha * g + (1 - alpha) * torch.diag(torch.diagonal(g)) for g in grams]
    rhs = sum(t @ w.T for t, w in zip(tilde, weights, strict=True))
    return torch.linalg.solve(sum(tilde), rhs).T


def _gram(batches):
    x = torch.cat(batches)
    return x.T @ x / x.shape[0]


@pytest.mark.parametrize("alpha", [1.0, 0.6])
def test_second_block_grams_use_the_merged_first_block_by_hand(alpha):
    models = [_stack(0), _stack(1)]
    data = [_data(10), _data(11)]
    seen = {}
    merged = regmean_plusplus(
        models, data, alpha=alpha, on_block=lambda layer, grams: seen.setdefault(layer, grams)
    )
    w0 = [m.layers[0].fc.weight.detach() for m in models]
    w1 = [m.layers[1].fc.weight.detach() for m in models]
    # block 0: inputs are the data themselves
    g0 = [_gram(d) for d in data]
    m0 = _closed_form(w0, g0, alpha)
    assert torch.allclose(merged["layers.0.fc.weight"], m0, atol=1e-10)
    # block 1: inputs are the MERGED block 0's outputs on each model's data
    g1 = [_gram([torch.tanh(x @ m0.T) for x in d]) for d in data]
    for i in range(2):
        assert torch.allclose(seen[1][i]["layers.1.fc.weight"].double(), g1[i], atol=1e-6)
    assert torch.allclose(merged["layers.1.fc.weight"], _closed_form(w1, g1, alpha), atol=1e-6)
    # RegMean's block-1 Grams (each model's own block 0) give another weight
    own = [_gram([torch.tanh(x @ w.T) for x in d]) for w, d in zip(w0, data, strict=True)]
    assert not torch.allclose(own[0], g1[0], atol=1e-3)
    assert not torch.allclose(merged["layers.1.fc.weight"], _closed_form(w1, own, alpha), atol=1e-4)


def test_one_block_equals_regmean():
    models = [_stack(s, n=1) for s in (0, 1, 2)]
    data = [_data(s) for s in (20, 21, 22)]
    pp = regmean_plusplus(models, data, alpha=0.8)
    grams = [collect_gram(m, d) for m, d in zip(models, data, strict=True)]
    plain = merge_with_statistics("regmean", [m.state_dict() for m in models], grams, alpha=0.8)
    assert set(pp) == set(plain)
    for n in plain:
        assert torch.allclose(pp[n], plain[n], atol=1e-8), n
    assert not torch.allclose(pp["layers.0.fc.weight"], models[0].layers[0].fc.weight, atol=1e-3)


def test_llama_blocks_first_layer_is_regmean_later_ones_differ():
    """Two Llamas sharing everything outside the blocks: block 0 sees the same inputs under
    both methods; block 1 does not (its inputs come from the merged block 0)."""
    a = tiny_llama(0).eval()
    b = tiny_llama(1).eval()
    outside = {n: t for n, t in a.state_dict().items() if not n.startswith("model.layers.")}
    b.load_state_dict(outside, strict=False)
    g = torch.Generator().manual_seed(0)
    data = [
        [{"input_ids": torch.randint(4, 64, (2, 5), generator=g)} for _ in range(2)]
        for _ in range(2)
    ]
    assert find_block_list(a) == "model.layers"
    pp = regmean_plusplus([a, b], data, alpha=0.9)
    grams = [collect_gram(m, d, exclude=["lm_head"]) for m, d in zip([a, b], data, strict=True)]
    plain = merge_with_statistics("regmean", [a.state_dict(), b.state_dict()], grams, alpha=0.9)
    for n in plain:
        if n.startswith("model.layers.0."):
            assert torch.allclose(pp[n], plain[n], atol=1e-5), n
    q1 = "model.layers.1.self_attn.q_proj.weight"
    assert not torch.allclose(pp[q1], plain[q1], atol=1e-4)
    assert torch.equal(pp["lm_head.weight"], (a.lm_head.weight + b.lm_head.weight).detach() / 2)


def test_errors():
    models = [_stack(0), _stack(1)]
    with pytest.raises(MergeValidationError, match="iterator"):
        regmean_plusplus(models, [iter(_data(0)), _data(1)])
    with pytest.raises(MergeValidationError, match="one per model"):
        regmean_plusplus(models, [_data(0)])
    with pytest.raises(MergeValidationError, match="no module"):
        regmean_plusplus(models, [_data(0), _data(1)], layers="blocks")
