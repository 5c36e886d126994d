"""Tiny HF model folders with word-level tokenizers, and tiny separable datasets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

WORDS = ["apple", "pear", "plum", "fig", "zebra", "lion", "tiger", "wolf", "the", "a", "is", "red"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "<s>", "</s>"]


def _tokenizer(folder: Path, bert: bool) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL + WORDS)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    kw = (
        dict(pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]")
        if bert
        else dict(pad_token="[PAD]", unk_token="[UNK]", bos_token="<s>", eos_token="</s>")
    )
    PreTrainedTokenizerFast(tokenizer_object=tk, **kw).save_pretrained(folder)


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    from transformers import BertConfig, BertModel

    folder = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=len(SPECIAL + WORDS),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=64,
    )
    BertModel(cfg).save_pretrained(folder)
    _tokenizer(folder, bert=True)
    return folder


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(SPECIAL + WORDS),
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=5,
        eos_token_id=6,
        pad_token_id=0,
        # a larger init than 0.02, so the frozen head can express confident predictions
        initializer_range=0.3,
    )
    LlamaForCausalLM(cfg).save_pretrained(folder)
    _tokenizer(folder, bert=False)
    return folder


@pytest.fixture
def fruit_csv(tmp_path) -> Path:
    """Two classes a bag-of-words model separates: fruit words vs animal words."""
    import random

    rng = random.Random(0)
    rows = ["text,label"]
    for _ in range(60):
        rows.append(" ".join([*rng.choices(WORDS[:4], k=4), "is", "red"]) + ",fruit")
        rows.append(" ".join([*rng.choices(WORDS[4:8], k=4), "is", "red"]) + ",animal")
    path = tmp_path / "fruit.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.fixture
def lm_jsonl(tmp_path) -> Path:
    """A prompt/completion set with a learnable rule: 'the apple' -> 'is red'."""
    lines = [
        json.dumps({"prompt": f"the {w}", "completion": f"is red {w}"})
        for w in WORDS[:8]
        for _ in range(8)
    ]
    path = tmp_path / "lm.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path
