"""Prompt tuning and prefix tuning rows in mixed-adapter batches (`splice.adapters.mixed_prompts`):
each row equals the row run alone with its adapter active (prompt rows: their last n + T
positions; other rows: their last T), with LoRA rows and base rows in the same batch, on
Llama (rotary), Qwen2 and GPT-2 (absolute positions)."""

from __future__ import annotations

import random

import pytest
import torch
from tiny import randomize, tiny_gpt2, tiny_llama

from splice.adapters import AdapterModel, AdapterStateError, make_config
from tiny_hf import tiny_qwen2

FACTORIES = {"llama": tiny_llama, "qwen2": tiny_qwen2, "gpt2": tiny_gpt2}
ATTN = {"llama": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj"], "gpt2": ["c_attn"]}


def model_with(kind: str) -> AdapterModel:
    am = AdapterModel(FACTORIES[kind](0).eval()).eval()
    am.add_adapter("p3", make_config("prompt_tuning", {"num_virtual_tokens": 3}))
    am.add_adapter("p5", make_config("prompt_tuning", {"num_virtual_tokens": 5}))
    am.add_adapter("k2", make_config("prefix_tuning", {"num_virtual_tokens": 2}))
    am.add_adapter("k4", make_config("prefix_tuning", {"num_virtual_tokens": 4}))
    am.add_adapter("lora", make_config("lora", {"r": 4, "target_modules": ATTN[kind]}))
    randomize(am.adapter_parameters("lora"), seed=5, scale=0.3)
    return am


def batch_of(rows: int, seed: int, padded: bool) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 64, (rows, 6), generator=g)
    mask = torch.ones(rows, 6, dtype=torch.long)
    if padded:  # left padding of various lengths
        for r in range(rows):
            mask[r, : r % 3] = 0
    return {"input_ids": ids, "attention_mask": mask}


@torch.no_grad()
def alone(am: AdapterModel, batch: dict, row: int, name: str) -> torch.Tensor:
    one = {k: v[row : row + 1] for k, v in batch.items()}
    if name == "__base__":
        with am.disabled():
            return am(**one).logits
    am.set_active(name)
    return am(**one).logits


def check(am: AdapterModel, names: list[str], batch: dict) -> torch.Tensor:
    with torch.no_grad():
        mixed = am(**batch, adapter_names=names).logits
    length = batch["input_ids"].shape[1]
    for row, name in enumerate(names):
        want = alone(am, batch, row, name)
        got = mixed[row : row + 1, mixed.shape[1] - want.shape[1] :]
        assert want.shape[1] - length == (int(name[1]) if name.startswith("p") else 0)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    return mixed


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("padded", [False, True])
def test_rows_equal_each_row_alone(kind: str, padded: bool) -> None:
    am = model_with(kind)
    names = ["p3", "k4", "__base__", "p5", "lora", "k2", "p3"]
    mixed = check(am, names, batch_of(len(names), seed=1, padded=padded))
    assert mixed.shape[1] == 5 + 6  # the longest prompt plus the input
    # the adapters matter: the same input under p3, k4 and the base differs
    same = batch_of(3, seed=2, padded=False)
    same = {k: v[:1].expand(3, -1) for k, v in same.items()}
    with torch.no_grad():
        out = am(**same, adapter_names=["p3", "k4", "__base__"]).logits[:, -6:]
    assert (out[0] - out[2]).abs().max() > 1e-3 and (out[1] - out[2]).abs().max() > 1e-3


def test_random_assignments() -> None:
    """Property: random rows ← {prompt, prefix, LoRA, base}; every row equals it alone."""
    am = model_with("llama")
    rng = random.Random(0)
    for trial in range(4):
        names = [rng.choice(["p3", "p5", "k2", "k4", "lora", "__base__"]) for _ in range(5)]
        check(am, names, batch_of(5, seed=10 + trial, padded=trial % 2 == 1))


def test_labels_and_given_positions() -> None:
    """Labels get −100 on the virtual positions (the loss of a prompt-only batch equals the
    adapter's own); given position_ids: dropped for prompt rows, shifted for prefix rows."""
    am = model_with("llama")
    batch = batch_of(2, seed=3, padded=False)
    labels = batch["input_ids"].clone()
    with torch.no_grad():
        mixed = am(**batch, labels=labels, adapter_names=["p3", "p3"]).loss
        am.set_active("p3")
        want = am(**batch, labels=labels).loss
    torch.testing.assert_close(mixed, want, atol=1e-6, rtol=0)
    pos = torch.arange(3, 9)[None, :].expand(3, -1)
    names = ["k2", "__base__", "p3"]
    batch = {**batch_of(3, seed=4, padded=False), "position_ids": pos}
    with torch.no_grad():
        got = am(**batch, adapter_names=names).logits
        for row, name in enumerate(names):
            one = {k: v[row : row + 1] for k, v in batch.items()}
            if name == "__base__":
                with am.disabled():
                    want = am(**one).logits
            else:
                am.set_active(name)
                want = am(**one).logits
            torch.testing.assert_close(
                got[row : row + 1, -want.shape[1] :], want, atol=1e-5, rtol=0
            )


def test_refused_uses() -> None:
    am = model_with("llama")
    batch = batch_of(2, seed=1, padded=False)
    with pytest.raises(AdapterStateError, match=r"row 1: adapter 'p3' .* not in a weighted set"):
        am(**batch, adapter_names=["lora", {"p3": 0.5, "lora": 0.5}])
    with pytest.raises(AdapterStateError, match="token_type_ids"):
        am(**batch, token_type_ids=torch.zeros_like(batch["input_ids"]), adapter_names=["p3"] * 2)


GREEDY = {"do_sample": False, "max_new_tokens": 5, "pad_token_id": 0}


@torch.no_grad()
def greedy_alone(am: AdapterModel, ids: torch.Tensor, name: str, steps: int) -> torch.Tensor:
    """``ids`` (1 × t, no padding) continued greedily by full forwards (no cache) with
    ``name`` active: the reference for a row of a mixed `generate`, independent of how
    ``generate`` hands its cache around."""
    for _ in range(steps):
        if name == "__base__":
            with am.disabled():
                logits = am(input_ids=ids).logits
        else:
            am.set_active(name)
            logits = am(input_ids=ids).logits
        ids = torch.cat([ids, logits[:, -1:].argmax(-1)], dim=1)
    return ids[0]


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_generate_rows_equal_each_sequence_generated_alone(kind: str) -> None:
    """Greedy `generate` of a left-padded batch mixing prompt, prefix, LoRA and base rows
    (KV cache on): each row equals its sequence continued alone with its adapter active."""
    am = model_with(kind)
    names = ["p3", "k4", "__base__", "p5", "lora", "k2"]
    batch = batch_of(len(names), seed=3, padded=True)
    batch["input_ids"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, 0)
    greedy = GREEDY | {"eos_token_id": None, "min_new_tokens": 5}  # every row makes 5 tokens
    with torch.no_grad():
        mixed = am.generate(**batch, adapter_names=names, **greedy)
        with am.disabled():
            base = am.generate(**batch, **greedy)
    width = batch["input_ids"].shape[1]
    assert mixed.shape == (len(names), width + 5)
    for row, name in enumerate(names):
        start = int(batch["attention_mask"][row].argmax())  # the row alone: no padding
        want = greedy_alone(am, batch["input_ids"][row : row + 1, start:], name, 5)
        assert torch.equal(mixed[row, start:], want), (row, name)
    # the model-level adapters change their rows' answers (else the test proves nothing)
    changed = [not torch.equal(mixed[r], base[r]) for r in range(len(names))]
    assert (changed[0] or changed[3]) and (changed[1] or changed[5])  # prompt, prefix rows
    assert all(layer.mixed_plan is None for _, layer in am.adapted_layers())
    assert "prepare_inputs_for_generation" not in vars(am.model)
