"""Prompt tuning: the rewritten call on hand values, the definition (a prompt equal to real
token embeddings is that context), TEXT / SAMPLE_VOCAB / RANDOM init as PEFT, PEFT parity
both ways (logits, loss, greedy generation), training, and clear errors."""

import json

import pytest
import torch
from peft import PromptTuningConfig as PeftPromptTuningConfig
from peft import get_peft_model
from prompt_parity import (
    assert_generation_equals_full_forwards,
    padded_batch,
    peft_to_splice,
    splice_to_peft,
)
from safetensors.torch import load_file
from tiny import inputs, randomize, tiny_bert_cls, tiny_llama, tiny_tokenizer_dir

from splice.adapters import (
    AdapterConfigError,
    AdapterModel,
    AdapterStateError,
    PromptTuningConfig,
    load_adapter_model,
    save_adapter,
)
from splice.adapters.methods.prompt_tuning import text_init_ids


def _adapted(n=2, **kw):
    am = AdapterModel(tiny_llama())
    am.add_adapter("p", PromptTuningConfig(num_virtual_tokens=n, **kw))
    return am


def test_prepared_call_on_hand_values():
    am = _adapted(n=2)
    mod = am.model_adapter("p")
    emb = am.model.get_input_embeddings().weight
    with torch.no_grad():
        mod.prompt_embeddings.copy_(torch.arange(64.0).view(2, 32))
    ids = torch.tensor([[3, 4, 5]])
    mask = torch.tensor([[0, 1, 1]])
    labels = torch.tensor([[-100, 4, 5]])
    # positional input_ids, attention_mask (LlamaForCausalLM.forward's order) are bound by name
    _, kw = mod.prepare(am.model, (ids, mask), {"labels": labels, "position_ids": ids})
    assert kw["input_ids"] is None
    assert kw["position_ids"] is None  # dropped: the model numbers the longer sequence (PEFT)
    x = kw["inputs_embeds"]
    assert x.shape == (1, 5, 32)
    # rows 0, 1 are P = [[0..31], [32..63]]; rows 2..4 are the embeddings of tokens 3, 4, 5
    torch.testing.assert_close(x[0, :2], torch.arange(64.0).view(2, 32))
    torch.testing.assert_close(x[0, 2:], emb[[3, 4, 5]])
    assert kw["attention_mask"].tolist() == [[1, 1, 0, 1, 1]]
    assert kw["labels"].tolist() == [[-100, -100, -100, 4, 5]]


def test_prompt_of_token_embeddings_is_that_context():
    """P = E[c] makes the adapted model on x the base model on [c; x] (all n + T logits)."""
    c = torch.tensor([7, 11, 13])
    am = _adapted(n=3)
    with torch.no_grad():
        am.model_adapter("p").prompt_embeddings.copy_(am.model.get_input_embeddings().weight[c])
    b = padded_batch()
    base = tiny_llama()
    ctx_ids = torch.cat([c.expand(2, -1), b["input_ids"]], dim=1)
    ctx_mask = torch.cat([torch.ones(2, 3, dtype=torch.long), b["attention_mask"]], dim=1)
    with torch.no_grad():
        want = base(input_ids=ctx_ids, attention_mask=ctx_mask).logits
        got = am(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    assert got.shape == (2, 10, 64)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    with am.disabled():  # the base model, no virtual positions
        torch.testing.assert_close(am(**inputs()).logits, base(**inputs()).logits)


def test_text_init_ids_repeat_and_cut():
    assert text_init_ids([0, 5, 9, 7], 6) == [0, 5, 9, 7, 0, 5]  # ⌈6/4⌉ = 2 copies, cut to 6
    assert text_init_ids([0, 5, 9, 7], 3) == [0, 5, 9]
    assert text_init_ids([4], 2) == [4, 4]


def test_text_init_is_the_text_embeddings_and_equals_peft(tmp_path):
    tok = tiny_tokenizer_dir(tmp_path / "tok")
    cfg = dict(
        num_virtual_tokens=6,
        prompt_tuning_init="TEXT",
        prompt_tuning_init_text="w5 w9 w7",
        tokenizer_name_or_path=tok,
    )
    am = _adapted(**{k: v for k, v in cfg.items() if k != "num_virtual_tokens"}, n=6)
    emb = am.model.get_input_embeddings().weight
    # "<s> w5 w9 w7" = ids [0, 5, 9, 7], repeated and cut to 6: [0, 5, 9, 7, 0, 5]
    torch.testing.assert_close(am.model_adapter("p").prompt_embeddings, emb[[0, 5, 9, 7, 0, 5]])
    pm = get_peft_model(tiny_llama(), PeftPromptTuningConfig(task_type="CAUSAL_LM", **cfg))
    torch.testing.assert_close(
        am.model_adapter("p").prompt_embeddings, pm.prompt_encoder["default"].embedding.weight
    )


@pytest.mark.parametrize("init", ["RANDOM", "SAMPLE_VOCAB"])
def test_random_inits_draw_as_peft(init):
    base = tiny_llama()
    torch.manual_seed(11)
    pm = get_peft_model(
        base,
        PeftPromptTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=5, prompt_tuning_init=init
        ),
    )
    am = AdapterModel(tiny_llama())
    torch.manual_seed(11)
    am.add_adapter("p", PromptTuningConfig(num_virtual_tokens=5, prompt_tuning_init=init))
    got = am.model_adapter("p").prompt_embeddings
    torch.testing.assert_close(got, pm.prompt_encoder["default"].embedding.weight)
    if init == "SAMPLE_VOCAB":  # every row is some token's embedding
        emb = am.model.get_input_embeddings().weight
        assert all((emb - row).abs().amax(1).min() == 0 for row in got)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_peft_to_splice_random(kind, tmp_path):
    peft_to_splice(
        kind, PeftPromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4), tmp_path
    )


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_splice_to_peft_random(kind, tmp_path):
    splice_to_peft(kind, PromptTuningConfig(num_virtual_tokens=4), tmp_path)
    saved = load_file(tmp_path / "splice" / "adapter_model.safetensors")
    assert list(saved) == ["prompt_embeddings"] and saved["prompt_embeddings"].shape == (4, 32)
    cfg = json.loads((tmp_path / "splice" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "PROMPT_TUNING" and cfg["task_type"] == "CAUSAL_LM"
    assert (cfg["token_dim"], cfg["num_layers"], cfg["num_virtual_tokens"]) == (32, 2, 4)
    assert "target_modules" not in cfg


def test_text_init_parity_both_ways_and_load_needs_no_tokenizer(tmp_path):
    import shutil

    tok = tiny_tokenizer_dir(tmp_path / "tok")
    text = dict(
        prompt_tuning_init="TEXT", prompt_tuning_init_text="w3 w4", tokenizer_name_or_path=tok
    )
    splice_to_peft("llama", PromptTuningConfig(num_virtual_tokens=3, **text), tmp_path)
    shutil.rmtree(tok)  # loading a saved adapter runs no init: no tokenizer needed
    am = load_adapter_model(tiny_llama(), tmp_path / "splice")
    assert am.configs["default"].prompt_tuning_init == "TEXT"


def test_peft_to_splice_text(tmp_path):
    tok = tiny_tokenizer_dir(tmp_path / "tok")
    peft_to_splice(
        "llama",
        PeftPromptTuningConfig(
            task_type="CAUSAL_LM",
            num_virtual_tokens=5,
            prompt_tuning_init="TEXT",
            prompt_tuning_init_text="w8 w9 w10",
            tokenizer_name_or_path=tok,
        ),
        tmp_path,
    )


def test_generate_of_a_peft_prompt_equals_full_forwards(tmp_path):
    am, _ = peft_to_splice(
        "llama", PeftPromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3), tmp_path
    )
    assert_generation_equals_full_forwards(am)
    # the prompt changes what is generated (scores), so the comparison means something
    b = padded_batch()
    b.pop("labels")
    kw = dict(max_new_tokens=1, do_sample=False, output_scores=True, return_dict_in_generate=True)
    with am.disabled():
        plain = am.generate(**b, **kw, pad_token_id=0).scores[0]
    assert (am.generate(**b, **kw, pad_token_id=0).scores[0] - plain).abs().max() > 1e-3


def test_step_by_step_decoding_with_the_returned_cache():
    """A non-empty cache already holds the prompt: the next call only extends the mask."""
    am = _adapted(n=3)
    randomize(am.adapter_parameters("p"))
    b = inputs()
    with torch.no_grad():
        full = am(**b).logits
        first = am(input_ids=b["input_ids"][:, :5], attention_mask=b["attention_mask"][:, :5])
        nxt = am(
            input_ids=b["input_ids"][:, 5:],
            attention_mask=b["attention_mask"],
            past_key_values=first.past_key_values,
        )
    torch.testing.assert_close(nxt.logits, full[:, -2:], atol=1e-5, rtol=0)


def test_training_moves_only_the_prompt():
    am = _adapted(n=4)
    assert [n for n, p in am.named_parameters() if p.requires_grad] == [
        "model_adapters.p.prompt_embeddings"
    ]
    assert am.trainable_parameters()[0] == 4 * 32
    frozen = {n: p.detach().clone() for n, p in am.named_parameters() if not p.requires_grad}
    start = am.model_adapter("p").prompt_embeddings.detach().clone()
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
    assert not torch.equal(am.model_adapter("p").prompt_embeddings, start)


def test_no_fold_no_deltas():
    am = _adapted()
    with pytest.raises(AdapterStateError, match="model-level adapter: no weights to fold"):
        am.fold("p")
    with pytest.raises(AdapterStateError, match="model-level adapter: it has no delta"):
        am.deltas("p")


def test_bad_configs(tmp_path):
    with pytest.raises(AdapterConfigError, match="num_virtual_tokens must be a positive"):
        PromptTuningConfig.from_dict({"num_virtual_tokens": 0})
    with pytest.raises(AdapterConfigError, match="num_virtual_tokens must be a positive"):
        PromptTuningConfig()
    with pytest.raises(AdapterConfigError, match="needs prompt_tuning_init_text"):
        PromptTuningConfig(
            num_virtual_tokens=2, prompt_tuning_init="TEXT", tokenizer_name_or_path="x"
        )
    with pytest.raises(AdapterConfigError, match="needs tokenizer_name_or_path"):
        PromptTuningConfig(
            num_virtual_tokens=2, prompt_tuning_init="TEXT", prompt_tuning_init_text="a"
        )
    with pytest.raises(AdapterConfigError, match="tokenizer_kwargs only apply"):
        PromptTuningConfig(num_virtual_tokens=2, tokenizer_kwargs={"use_fast": True})
    with pytest.raises(AdapterConfigError, match="did you mean 'num_virtual_tokens'"):
        PromptTuningConfig.from_dict({"num_virtual_token": 2})
    with pytest.raises(AdapterConfigError, match="target_modules / exclude_modules do not apply"):
        PromptTuningConfig(num_virtual_tokens=2, target_modules=["q_proj"])
    with pytest.raises(AdapterConfigError, match="only decoder-only"):
        PromptTuningConfig(num_virtual_tokens=2, num_transformer_submodules=2)
    am = AdapterModel(tiny_llama())
    with pytest.raises(AdapterConfigError, match="token_dim=30, but the model's embeddings are 32"):
        am.add_adapter("p", PromptTuningConfig(num_virtual_tokens=2, token_dim=30))
    with pytest.raises(AdapterConfigError, match="cannot load tokenizer"):
        am.add_adapter(
            "p",
            PromptTuningConfig(
                num_virtual_tokens=2,
                prompt_tuning_init="TEXT",
                prompt_tuning_init_text="w3",
                tokenizer_name_or_path=str(tmp_path / "missing"),
            ),
        )
    assert not am.configs and not len(am.model_adapters)  # nothing half-added
    with pytest.raises(AdapterConfigError, match=r"decoder-only causal LMs.*BertForSequence"):
        AdapterModel(tiny_bert_cls()).add_adapter("p", PromptTuningConfig(num_virtual_tokens=2))


def test_save_load_roundtrip(tmp_path):
    am = _adapted(n=3)
    randomize(am.adapter_parameters("p"))
    want = am(**inputs()).logits
    save_adapter(am, tmp_path / "a", name="p")
    back = load_adapter_model(tiny_llama(), tmp_path / "a")
    torch.testing.assert_close(back(**inputs()).logits, want)
    assert not any(p.requires_grad for p in back.parameters())
