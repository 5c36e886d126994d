"""A tiny BERT (hidden 32, 2 layers) with a WordPiece vocab, and two synthetic CSV tasks
whose label is carried by keywords, so a few epochs learn them."""

from __future__ import annotations

import csv
import random
from pathlib import Path

import pytest
import torch
from bench_test_util import FILLERS, SPECIAL, TASKS


def _vocab() -> list[str]:
    words = list(FILLERS)
    for classes in TASKS.values():
        for kws in classes.values():
            words += kws
    return SPECIAL + words


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = tmp_path_factory.mktemp("bench-tiny-bert")
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(_vocab()) + "\n")
    BertTokenizerFast(
        str(vocab), do_lower_case=True
    )  # positional: v4 and v5.save_pretrained(folder)
    cfg = BertConfig(
        vocab_size=len(_vocab()),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,  # a tiny model learns the keywords faster without dropout
        attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(0)
    BertModel(cfg).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_tasks(tmp_path_factory) -> list[Path]:
    """Two CSV files (text,label): 2 and 3 classes, 150 examples per class."""
    folder = tmp_path_factory.mktemp("bench-tasks")
    rng = random.Random(0)
    paths = []
    for task, classes in TASKS.items():
        path = folder / f"{task}.csv"
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["text", "label"])
            for label, kws in classes.items():
                for _ in range(150):
                    words = rng.choices(FILLERS, k=rng.randint(3, 6))
                    words.insert(rng.randrange(len(words) + 1), rng.choice(kws))
                    w.writerow([" ".join(words), label])
        paths.append(path)
    return paths


@pytest.fixture
def bench_cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("SPLICE_CACHE", str(cache))
    return cache
