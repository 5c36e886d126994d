"""Prefix tuning: PEFT's key/value layout on hand values, the definition (a prefix equal to a
real context's keys/values is that context), the MLP reparameterization, init as PEFT, PEFT
parity both ways (logits, loss, greedy generation; Llama with GQA and GPT-2), training, and
clear errors."""

import pytest
import torch
from peft import PrefixTuningConfig as PeftPrefixTuningConfig
from peft import get_peft_model
from prompt_parity import (
    assert_generation_equals_full_forwards,
    padded_batch,
    peft_to_splice,
    splice_to_peft,
)
from safetensors.torch import load_file
from tiny import inputs, randomize, tiny_bert_cls, tiny_gpt2, tiny_llama

from splice.adapters import (
    AdapterConfigError,
    AdapterModel,
    AdapterStateError,
    PrefixTuningConfig,
    load_adapter_model,
    save_adapter,
)
from splice.adapters.methods.prefix_tuning import prefix_key_values


def _adapted(n=2, model=None, **kw):
    am = AdapterModel(model if model is not None else tiny_llama())
    am.add_adapter("p", PrefixTuningConfig(num_virtual_tokens=n, **kw))
    return am


def test_layout_on_hand_values():
    # 2 layers, 2 heads of size 1, one virtual token: F = [0 1 | 2 3 | 4 5 | 6 7]
    # = (layer 0 key: heads 0,1 | layer 0 value | layer 1 key | layer 1 value)
    flat = torch.arange(8.0).view(1, 1, 8)
    (k0, v0), (k1, v1) = prefix_key_values(flat, num_layers=2, num_heads=2)
    assert k0.shape == (1, 2, 1, 1)  # (batch, heads, n, head_dim)
    assert k0.flatten().tolist() == [0, 1] and v0.flatten().tolist() == [2, 3]
    assert k1.flatten().tolist() == [4, 5] and v1.flatten().tolist() == [6, 7]
    # two virtual tokens, head size 2, one layer, one head: token t gives key F[t, 0:2]
    flat = torch.tensor([[[1.0, 2, 3, 4], [5, 6, 7, 8]]])
    ((k, v),) = prefix_key_values(flat, num_layers=1, num_heads=1)
    assert k.tolist() == [[[[1, 2], [5, 6]]]] and v.tolist() == [[[[3, 4], [7, 8]]]]
    with pytest.raises(AdapterStateError, match="not 2 × 2 layers × 3 heads"):
        prefix_key_values(torch.zeros(1, 1, 8), num_layers=2, num_heads=3)


def test_gqa_sizes_and_prepared_call():
    am = _adapted(n=3)
    cfg = am.configs["p"]
    # tiny llama: 4 query heads, 2 key/value heads of size 32/4 = 8: the prefix is sized to the
    # key/value heads (PEFT): token_dim 2*8 = 16, F: 3 x (2 layers * 2 * 16)
    assert (cfg.token_dim, cfg.num_attention_heads, cfg.num_layers) == (16, 2, 2)
    assert cfg.encoder_hidden_size == 16
    mod = am.model_adapter("p")
    assert mod.embedding.weight.shape == (3, 64)
    ids = torch.tensor([[3, 4], [5, 6]])
    _, kw = mod.prepare(
        am.model,
        (ids,),
        {
            "attention_mask": torch.tensor([[1, 1], [0, 1]]),
            "position_ids": torch.tensor([[0, 1], [0, 1]]),
        },
    )
    assert kw["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 1]]
    assert kw["position_ids"].tolist() == [[3, 4], [3, 4]]  # shifted by n (PEFT)
    cache = kw["past_key_values"]
    assert cache.get_seq_length() == 3
    f = mod.embedding.weight.detach()
    k1 = cache.layers[1].keys  # layer 1 key = F[:, 32:48] as (heads 2, n 3, 8)
    assert k1.shape == (2, 2, 3, 8)
    torch.testing.assert_close(k1[1], f[:, 32:48].view(3, 2, 8).transpose(0, 1))


def _flat_from_cache(cache, n: int) -> torch.Tensor:
    """Inverse of PEFT's layout: per token, (layer 0 key, layer 0 value, layer 1 key, ...),
    each heads x head_dim, heads major."""
    rows = []
    for t in range(n):
        parts = []
        for layer in cache.layers:
            parts += [layer.keys[0, :, t].reshape(-1), layer.values[0, :, t].reshape(-1)]
        rows.append(torch.cat(parts))
    return torch.stack(rows)


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_prefix_of_real_keys_values_is_that_context(make):
    """Setting F to the keys/values the base model computes for a context c makes the adapted
    model on x the base model on [c; x] (positions of x start at n in both)."""
    c = torch.tensor([[7, 11, 13]])
    base = make()
    with torch.no_grad():
        cache = base(input_ids=c, use_cache=True).past_key_values
    am = _adapted(n=3, model=make())
    with torch.no_grad():
        am.model_adapter("p").embedding.weight.copy_(_flat_from_cache(cache, 3))
    b = padded_batch()
    ctx_ids = torch.cat([c.expand(2, -1), b["input_ids"]], dim=1)
    ctx_mask = torch.cat([torch.ones(2, 3, dtype=torch.long), b["attention_mask"]], dim=1)
    with torch.no_grad():
        want = base(input_ids=ctx_ids, attention_mask=ctx_mask).logits[:, 3:]
        got = am(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    assert got.shape == (2, 7, 64)  # no virtual positions in the output (a cache, not tokens)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_projection_is_the_mlp():
    am = _adapted(n=2, prefix_projection=True, encoder_hidden_size=5)
    mod = am.model_adapter("p")
    e = mod.embedding.weight
    w1, b1 = mod.transform[0].weight, mod.transform[0].bias
    w2, b2 = mod.transform[2].weight, mod.transform[2].bias
    assert (e.shape, w1.shape, w2.shape) == ((2, 16), (5, 16), (64, 5))
    # F = W2 tanh(W1 E + b1) + b2, row by row
    want = torch.stack([w2 @ torch.tanh(w1 @ e[i] + b1) + b2 for i in range(2)])
    torch.testing.assert_close(mod.prefix(), want)
    torch.testing.assert_close(mod.peft_state()["prompt_embeddings"], want.detach())


@pytest.mark.parametrize("projection", [False, True])
def test_init_draws_as_peft(projection):
    kw = dict(num_virtual_tokens=3, prefix_projection=projection, encoder_hidden_size=6)
    base = tiny_llama()  # (seeds itself: build both models before seeding the draws)
    am = AdapterModel(tiny_llama())
    torch.manual_seed(5)
    pm = get_peft_model(base, PeftPrefixTuningConfig(task_type="CAUSAL_LM", **kw))
    torch.manual_seed(5)
    am.add_adapter("p", PrefixTuningConfig(**kw))
    want = pm.get_prompt_embedding_to_save("default")
    torch.testing.assert_close(am.model_adapter("p").prefix().detach(), want)


def test_zero_init():
    for proj in (False, True):
        am = _adapted(n=2, prefix_projection=proj, init_weights="zero")
        assert am.model_adapter("p").prefix().abs().max() == 0


PEFT_CASES = {
    "llama": ("llama", dict(num_virtual_tokens=4)),
    "llama-projection": (
        "llama",
        dict(num_virtual_tokens=3, prefix_projection=True, encoder_hidden_size=12),
    ),
    "gpt2": ("gpt2", dict(num_virtual_tokens=4)),
    "gpt2-projection": ("gpt2", dict(num_virtual_tokens=2, prefix_projection=True)),
}


@pytest.mark.parametrize("case", sorted(PEFT_CASES))
def test_peft_to_splice(case, tmp_path):
    kind, kw = PEFT_CASES[case]
    am, _ = peft_to_splice(kind, PeftPrefixTuningConfig(task_type="CAUSAL_LM", **kw), tmp_path)
    # a saved prefix is F itself (PEFT saves the MLP's output): it loads without the MLP
    assert [n for n, _ in am.named_parameters() if "model_adapters" in n] == [
        "model_adapters.default.embedding.weight"
    ]


@pytest.mark.parametrize("case", sorted(PEFT_CASES))
def test_splice_to_peft(case, tmp_path):
    kind, kw = PEFT_CASES[case]
    splice_to_peft(kind, PrefixTuningConfig(**kw), tmp_path)
    saved = load_file(tmp_path / "splice" / "adapter_model.safetensors")
    width = {"llama": 2 * 2 * 16, "gpt2": 2 * 2 * 32}[kind]
    assert list(saved) == ["prompt_embeddings"]
    assert saved["prompt_embeddings"].shape == (kw["num_virtual_tokens"], width)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_generate_of_a_peft_prefix_equals_full_forwards(kind, tmp_path):
    am, _ = peft_to_splice(
        kind, PeftPrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3), tmp_path
    )
    assert_generation_equals_full_forwards(am)


def test_given_positions_and_step_by_step_decoding():
    am = _adapted(n=3)
    randomize(am.adapter_parameters("p"))
    b = inputs()
    with torch.no_grad():
        full = am(**b).logits
        pos = torch.arange(7).expand(2, -1)
        torch.testing.assert_close(am(**b, position_ids=pos).logits, full)
        first = am(input_ids=b["input_ids"][:, :5], attention_mask=b["attention_mask"][:, :5])
        nxt = am(
            input_ids=b["input_ids"][:, 5:],
            attention_mask=b["attention_mask"],
            past_key_values=first.past_key_values,
        )
    torch.testing.assert_close(nxt.logits, full[:, -2:], atol=1e-5, rtol=0)


@pytest.mark.parametrize("projection", [False, True])
def test_training_moves_only_the_prefix(projection):
    am = _adapted(n=3, prefix_projection=projection, encoder_hidden_size=8)
    own = {n for n, p in am.named_parameters() if p.requires_grad}
    assert own and all(n.startswith("model_adapters.p.") for n in own)
    frozen = {n: p.detach().clone() for n, p in am.named_parameters() if not p.requires_grad}
    start = am.model_adapter("p").prefix().detach().clone()
    opt = torch.optim.Adam(am.adapter_parameters("p"), lr=5e-2)
    batch = inputs(seed=5)
    am.train()
    losses = []
    for _ in range(5):
        loss = am(**batch, labels=batch["input_ids"]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    for n, p in am.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    assert not torch.equal(am.model_adapter("p").prefix().detach(), start)


def test_loaded_projection_trains_the_prefix_itself(tmp_path):
    am = _adapted(n=2, prefix_projection=True)
    randomize(am.adapter_parameters("p"))
    want = am(**inputs()).logits
    save_adapter(am, tmp_path / "a", name="p")
    back = load_adapter_model(tiny_llama(), tmp_path / "a", trainable=True)
    torch.testing.assert_close(back(**inputs()).logits, want, atol=1e-6, rtol=0)
    assert back.trainable_parameters()[0] == 2 * 64
    with pytest.raises(AdapterStateError, match="cannot be loaded into the MLP"):
        am.model_adapter("p").load_peft_state({"prompt_embeddings": torch.zeros(2, 64)}, "x")


def test_no_fold_no_deltas():
    am = _adapted()
    with pytest.raises(AdapterStateError, match="model-level adapter: no weights to fold"):
        am.fold("p")
    with pytest.raises(AdapterStateError, match="model-level adapter: it has no delta"):
        am.deltas("p")


def test_bad_configs():
    with pytest.raises(AdapterConfigError, match="num_virtual_tokens must be a positive"):
        PrefixTuningConfig.from_dict({"num_virtual_tokens": 0})
    with pytest.raises(AdapterConfigError, match="encoder_hidden_size must be positive"):
        PrefixTuningConfig(num_virtual_tokens=2, encoder_hidden_size=0)
    with pytest.raises(AdapterConfigError, match="did you mean 'prefix_projection'"):
        PrefixTuningConfig.from_dict({"num_virtual_tokens": 2, "prefix_projections": True})
    with pytest.raises(AdapterConfigError, match="'init_weights'"):
        PrefixTuningConfig.from_dict({"num_virtual_tokens": 2, "init_weights": "ones"})
    with pytest.raises(AdapterConfigError, match=r"num_layers=3.*2 layers"):
        AdapterModel(tiny_llama()).add_adapter(
            "p", PrefixTuningConfig(num_virtual_tokens=2, num_layers=3)
        )
    with pytest.raises(AdapterConfigError, match="token_dim=30 do not fit"):
        AdapterModel(tiny_gpt2()).add_adapter(
            "p", PrefixTuningConfig(num_virtual_tokens=2, token_dim=30)
        )
    with pytest.raises(AdapterConfigError, match="decoder-only causal LMs"):
        AdapterModel(tiny_bert_cls()).add_adapter("p", PrefixTuningConfig(num_virtual_tokens=2))
    sliding = tiny_llama()
    sliding.config.layer_types = ["sliding_attention", "full_attention"]
    with pytest.raises(AdapterConfigError, match="sliding-window or shared key/value layers"):
        AdapterModel(sliding).add_adapter("p", PrefixTuningConfig(num_virtual_tokens=2))


def test_two_model_level_adapters_cannot_generate_together():
    am = _adapted()
    am.add_adapter("q", PrefixTuningConfig(num_virtual_tokens=1))
    am.set_active(["p", "q"])
    with pytest.raises(AdapterStateError, match="several active model-level adapters"):
        am.generate(**inputs(), max_new_tokens=1)
