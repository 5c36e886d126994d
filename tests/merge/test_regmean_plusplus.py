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
from tiny_hf import tiny_bert_config, tiny_llama


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


class ScaledStack(Stack):
    """Not a chain: the hidden states are doubled between blocks."""

    def forward(self, x):
        for block in self.layers:
            x = 2 * block(x)
        return x


def _same(a, b, atol=0.0):
    assert set(a) == set(b)
    for n in a:
        assert torch.allclose(a[n], b[n], rtol=0, atol=atol), (n, (a[n] - b[n]).abs().max())


def test_cached_inputs_equal_recomputed_ones_on_a_chain():
    models = [_stack(0, n=4), _stack(1, n=4), _stack(2, n=4)]
    data = [_data(s) for s in (30, 31, 32)]
    cached, recomputed = {}, {}
    a = regmean_plusplus(models, data, alpha=0.7, on_block=lambda k, g: cached.setdefault(k, g))
    b = regmean_plusplus(
        models,
        data,
        alpha=0.7,
        cache_activations=False,
        on_block=lambda k, g: recomputed.setdefault(k, g),
    )
    _same(a, b, atol=1e-12)
    for layer in range(4):
        for g, h in zip(cached[layer], recomputed[layer], strict=True):
            _same(g, h, atol=1e-12)
    # and block 3's Grams are the merged blocks 0..2's outputs by hand
    x = data[1]
    for k in range(3):
        w = a[f"layers.{k}.fc.weight"]
        x = [torch.tanh(v @ w.T) for v in x]
    assert torch.allclose(cached[3][1]["layers.3.fc.weight"].double(), _gram(x), atol=1e-6)


def test_a_model_that_is_not_a_chain_falls_back_and_stays_exact():
    torch.manual_seed(0)
    models = [ScaledStack(3, 2).double(), ScaledStack(3, 2).double()]
    data = [_data(40), _data(41)]
    seen = {}
    with pytest.warns(UserWarning, match="do not form a chain"):
        merged = regmean_plusplus(
            models, data, alpha=1.0, on_block=lambda k, g: seen.setdefault(k, g)
        )
    m0 = merged["layers.0.fc.weight"]
    g1 = [_gram([2 * torch.tanh(x @ m0.T) for x in d]) for d in data]
    assert torch.allclose(seen[1][0]["layers.1.fc.weight"].double(), g1[0], atol=1e-6)


@pytest.mark.parametrize("use_cache", [True, False])
def test_llama_cached_equals_recomputed(use_cache):
    """A real HF decoder (rotary embeddings, causal mask, a key/value cache in the call when
    use_cache is on): the cached path replays the blocks exactly."""
    models = [tiny_llama(s, num_hidden_layers=3).eval() for s in (0, 1)]
    g = torch.Generator().manual_seed(1)
    data = [
        [
            {
                "input_ids": torch.randint(4, 64, (2, 6), generator=g),
                "attention_mask": torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 1]]),
                "use_cache": use_cache,
            }
            for _ in range(2)
        ]
        for _ in range(2)
    ]
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback
        a = regmean_plusplus(models, data, alpha=0.9)
    b = regmean_plusplus(models, data, alpha=0.9, cache_activations=False)
    _same(a, b, atol=1e-5)
    q2 = "model.layers.2.self_attn.q_proj.weight"
    assert not torch.allclose(a[q2], models[0].state_dict()[q2], atol=1e-3)


def test_bert_encoder_cached_equals_recomputed():
    from transformers import BertModel

    config = tiny_bert_config(num_hidden_layers=3)
    models = []
    for s in (0, 1):
        torch.manual_seed(s)
        models.append(BertModel(config).eval())
    g = torch.Generator().manual_seed(2)
    data = [
        [
            {
                "input_ids": torch.randint(1, 64, (2, 7), generator=g),
                "attention_mask": torch.tensor([[1] * 7, [1] * 4 + [0] * 3]),
            }
        ]
        for _ in range(2)
    ]
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        a = regmean_plusplus(models, data, alpha=0.5, layers="encoder.layer")
    b = regmean_plusplus(models, data, alpha=0.5, layers="encoder.layer", cache_activations=False)
    _same(a, b, atol=1e-5)
