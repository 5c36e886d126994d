"""A tiny BERT (hidden 32, 2 layers) with a WordPiece vocab, and two synthetic CSV tasks
whose label is carried by keywords, so a few epochs learn them; the tiny Llama's causal-LM
pool; a local Ray instance of 2 CPUs for a module."""

from __future__ import annotations

import csv
import json
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


@pytest.fixture(scope="session")
def tiny_lm_pool(tmp_path_factory) -> tuple[Path, list[str]]:
    """The tiny Llama folder, two text domains (.txt) and a prompt/answer task (.jsonl)."""
    from tiny_hf import save_tiny_llama_folder

    root = tmp_path_factory.mktemp("bench-lm")
    model = save_tiny_llama_folder(root / "llama")
    rng = random.Random(0)
    a = root / "abc.txt"
    a.write_text("\n".join("".join(rng.choices("abc ", k=12)) for _ in range(60)) + "\n")
    d = root / "digits.txt"
    d.write_text("\n".join("".join(rng.choices("0123 ", k=12)) for _ in range(60)) + "\n")
    em = root / "color.jsonl"
    rows = [
        {"prompt": f"word: {w}\ncat:", "completion": f" {c}"}
        for w, c in [("sky", "blue"), ("grass", "green"), ("sun", "yellow")] * 10
    ]
    em.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return model, [str(a), str(d), str(em)]


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray instance (2 CPUs) for the module; skipped when Ray is not installed."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()
