"""Training data: classification splits and causal-LM examples, tokenized into batches.

Classification data comes from `splice.data` (built-in tasks or a text/label file) with its
seeded stratified splits (80/10/10); ``max_train_examples`` caps the training split per
class (⌈max / classes⌉ each, so classes stay balanced as far as the data allows).
Causal-LM rows are ``text`` or ``prompt`` + ``completion``; without explicit validation /
test files a seeded 80/10/10 split of the rows is used.

Split sizes are checked here, before the output folder is made or the model loaded: every
split non-empty, and for classification every class in every split splice makes (a class
needs 5 examples for 80/10/10); a causal-LM file needs 3 rows.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from splice.data.dataset import TextClassificationDataset
from splice.data.splits import SPLIT_NAMES
from splice.errors import DataError
from splice.train.config import TrainConfig


@dataclass(frozen=True)
class LMExample:
    prompt: str  # no loss on these tokens ("" for plain text)
    completion: str  # loss on these tokens


def classification_splits(cfg: TrainConfig) -> dict[str, Any]:
    """The train / validation / test datasets, checked before any model is loaded.

    The seeded stratified 80/10/10 split must give every class at least one example in
    each split it makes (5 per class suffice), else `DataError` naming the class. A
    ``data.validation`` / ``data.test`` file replaces its split; its classes must be among
    the training classes and are mapped to them by name."""
    from splice.data import load_task, make_splits

    ds = load_task(cfg.data.train)
    per_class = None
    if cfg.data.max_train_examples:
        per_class = math.ceil(cfg.data.max_train_examples / ds.num_classes)
    splits = make_splits(ds, seed=cfg.seed, max_per_class={"train": per_class})
    parts = splits.apply(ds)
    given = [name for name in ("validation", "test") if getattr(cfg.data, name)]
    _check_every_class(cfg.data.train, ds, parts, [n for n in SPLIT_NAMES if n not in given])
    for name in given:
        path = getattr(cfg.data, name)
        parts[name] = _relabel(load_task(path), ds, f"data.{name} ({path})")
    cap = cfg.data.max_eval_examples
    for name in ("validation", "test"):
        if cap and len(parts[name]) > cap:
            parts[name] = parts[name].subset(range(cap))
    return {"parts": parts, "splits": splits, "dataset": ds}


def _check_every_class(
    where: str,
    ds: TextClassificationDataset,
    parts: dict[str, TextClassificationDataset],
    made: list[str],
) -> None:
    from splice.data.splits import min_class_size

    totals = ds.class_counts()
    for name in made:
        counts = parts[name].class_counts()
        missing = next((c for c, n in counts.items() if n == 0), None)
        if missing is not None:
            raise DataError(
                f"data.train ({where}): class {missing!r} has {totals[missing]} example(s), too "
                f"few for the seeded 80/10/10 split: {name} gets none (every class needs at "
                f"least {min_class_size()}; or give data.validation and data.test files)"
            )


def _relabel(
    other: TextClassificationDataset, train: TextClassificationDataset, where: str
) -> TextClassificationDataset:
    """``other`` with the training set's class ids (classes matched by name)."""
    index = {n: i for i, n in enumerate(train.label_names)}
    present = sorted({other.label_names[y] for y in other.labels})
    unknown = [n for n in present if n not in index]
    if unknown:
        raise DataError(
            f"{where} has classes that data.train lacks: {unknown[:5]}"
            f"{' ...' if len(unknown) > 5 else ''} (data.train has {len(index)} classes: "
            f"{list(train.label_names)[:10]}{' ...' if len(index) > 10 else ''})"
        )
    return TextClassificationDataset(
        texts=other.texts,
        labels=tuple(index[other.label_names[y]] for y in other.labels),
        label_names=train.label_names,
        source=other.source,
        info=dict(other.info),
    )


def lm_examples_from_file(path: Path) -> list[LMExample]:
    """Causal-LM examples of a .jsonl / .csv / .tsv file (`splice.data.user_file.read_rows`:
    the same one-line errors as classification data)."""
    from splice.data.user_file import read_rows

    if not path.exists():
        raise DataError(f"{path}: no such file")
    _, rows = read_rows(path)
    if not rows:
        raise DataError(f"{path}: no rows")
    out = []
    for number, row in rows:
        if "prompt" in row and "completion" in row:
            out.append(LMExample(str(row["prompt"]), str(row["completion"])))
        elif "text" in row:
            out.append(LMExample("", str(row["text"])))
        else:
            raise DataError(
                f"{path} line {number}: needs 'text', or 'prompt' and 'completion' "
                f"(has {sorted(row)})"
            )
    return out


def lm_splits(cfg: TrainConfig) -> dict[str, list[LMExample]]:
    path = Path(cfg.data.train)
    if path.suffix in (".jsonl", ".ndjson", ".csv", ".tsv") and path.exists():
        rows = lm_examples_from_file(path)
        order = list(range(len(rows)))
        random.Random(cfg.seed).shuffle(order)
        n_eval = max(1, round(0.1 * len(rows)))
        parts = {
            "test": [rows[i] for i in order[:n_eval]],
            "validation": [rows[i] for i in order[n_eval : 2 * n_eval]],
            "train": [rows[i] for i in order[2 * n_eval :]],
        }
    else:  # a built-in task: train on its texts, split as for classification
        cls = classification_splits(cfg)["parts"]
        parts = {k: [LMExample("", t) for t in v.texts] for k, v in cls.items()}
    for name in ("validation", "test"):
        p = getattr(cfg.data, name)
        if p:
            parts[name] = lm_examples_from_file(Path(p))
    if cfg.data.max_train_examples:
        parts["train"] = parts["train"][: cfg.data.max_train_examples]
    if cfg.data.max_eval_examples:
        for name in ("validation", "test"):
            parts[name] = parts[name][: cfg.data.max_eval_examples]
    for name in SPLIT_NAMES:
        if not parts[name]:
            raise DataError(
                f"data.train ({cfg.data.train}): no {name} examples: too few rows for the "
                "seeded 80/10/10 split (at least 3 are needed)"
            )
    return parts


MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def tokenize_batch(tokenizer: Any, texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
    """A classifier's inputs for a batch of texts: truncated, padded to the longest."""
    enc = tokenizer(
        texts, truncation=True, max_length=max_length, padding=True, return_tensors="pt"
    )
    return {k: v for k, v in enc.items() if k in MODEL_INPUTS}


def batch_indices(n: int, batch_size: int, shuffle_seed: int | None) -> Iterator[list[int]]:
    """``range(n)`` in batches, shuffled by ``shuffle_seed`` (in order when None)."""
    order = list(range(n))
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(order)
    for start in range(0, n, batch_size):
        yield order[start : start + batch_size]


def cls_batches(
    texts: list[str] | tuple[str, ...],
    labels: list[int] | tuple[int, ...],
    tokenizer: Any,
    batch_size: int,
    max_length: int,
    shuffle_seed: int | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    for idx in batch_indices(len(texts), batch_size, shuffle_seed):
        enc = tokenize_batch(tokenizer, [texts[i] for i in idx], max_length)
        enc["labels"] = torch.tensor([labels[i] for i in idx], dtype=torch.long)
        yield enc


def lm_encode(example: LMExample, tokenizer: Any, max_length: int) -> tuple[list[int], list[int]]:
    """(input ids, labels): prompt tokens get label −100; an EOS ends the completion."""
    prompt = (
        tokenizer(example.prompt, add_special_tokens=False)["input_ids"] if example.prompt else []
    )
    completion = tokenizer(example.completion, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        completion = [*completion, tokenizer.eos_token_id]
    bos = [tokenizer.bos_token_id] if getattr(tokenizer, "bos_token_id", None) is not None else []
    ids = (bos + prompt + completion)[:max_length]
    labels = ([-100] * (len(bos) + len(prompt)) + completion)[:max_length]
    return ids, labels


def lm_batches(
    examples: list[LMExample],
    tokenizer: Any,
    batch_size: int,
    max_length: int,
    shuffle_seed: int | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for idx in batch_indices(len(examples), batch_size, shuffle_seed):
        encoded = [lm_encode(examples[i], tokenizer, max_length) for i in idx]
        width = max(len(ids) for ids, _ in encoded)
        ids = torch.full((len(encoded), width), pad, dtype=torch.long)
        labels = torch.full((len(encoded), width), -100, dtype=torch.long)
        mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for row, (i, lab) in enumerate(encoded):  # right padding
            ids[row, : len(i)] = torch.tensor(i)
            labels[row, : len(lab)] = torch.tensor(lab)
            mask[row, : len(i)] = 1
        yield {"input_ids": ids, "attention_mask": mask, "labels": labels}
