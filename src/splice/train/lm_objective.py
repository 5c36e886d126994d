"""A coefficient-search objective on a causal LM: the merged model's mean loss on a text file.

    objective = LMLossObjective.from_file("smollm2-folder", "val.jsonl", max_length=128)
    search_coefficients("ties.yaml", objective, budget=30)      # splice.engine.coefficient_search

f(θ) = Σ_tokens CE(θ) / #tokens: the token-weighted mean cross-entropy of the labelled
tokens (`splice.train.loop.evaluate_lm`, as ``splice train`` reports held-out loss), over
fixed batches tokenized once. Rows: ``.jsonl`` / ``.csv`` / ``.tsv`` with ``text`` (loss on
every token) or ``prompt`` + ``completion`` (loss on the completion; `splice.train.data`),
or a ``.txt`` file, one example per non-empty line.

The model skeleton (architecture, tokenizer) is loaded once; each candidate's merged state
is copied into it (`load_state_dict`), so nothing is written per candidate. Every merged
tensor must be a tensor of the model; the model's tensors the merge does not hold must be
tied to one it does (the output embedding of tied-embedding models), else an error.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from splice.errors import DataError, SpliceError
from splice.train.data import LMExample, lm_batches, lm_examples_from_file
from splice.train.loop import evaluate_lm


def lm_examples(path: str | Path) -> list[LMExample]:
    """The examples of a .jsonl / .csv / .tsv file, or of a .txt file (one per line)."""
    p = Path(path)
    if p.suffix != ".txt":
        return lm_examples_from_file(p)
    from splice.io.textfile import read_text

    if not p.exists():
        raise DataError(f"{p}: no such file")
    lines = [line for line in read_text(p, DataError).splitlines() if line.strip()]
    if not lines:
        raise DataError(f"{p}: no text (the objective needs at least one non-empty line)")
    return [LMExample("", line) for line in lines]


class LMLossObjective:
    """Mean causal-LM loss of a merged state dict on fixed batches (lower is better)."""

    def __init__(self, model: torch.nn.Module, batches: list[dict[str, torch.Tensor]]):
        if not batches:
            raise DataError("the objective has no examples")
        if not any(bool((b["labels"][:, 1:] != -100).any()) for b in batches):
            raise DataError("the objective's examples have no tokens to predict (too short?)")
        self.model = model.eval()
        self.batches = batches
        names = model.state_dict(keep_vars=True)
        self._names = set(names)
        by_storage: dict[int, set[str]] = {}
        for n, t in names.items():
            by_storage.setdefault(t.data_ptr(), set()).add(n)
        self._tied = {n: by_storage[t.data_ptr()] - {n} for n, t in names.items()}
        self.calls = 0

    @classmethod
    def from_file(
        cls,
        model_ref: str,
        data: str | Path,
        *,
        max_examples: int | None = None,
        max_length: int = 512,
        batch_size: int = 8,
    ) -> LMLossObjective:
        from splice.train.models import load_for_task

        examples = lm_examples(data)  # checked before the model is loaded
        if max_examples:
            examples = examples[:max_examples]
        model, tokenizer, _ = load_for_task(model_ref, "causal_lm")
        return cls(model, list(lm_batches(examples, tokenizer, batch_size, max_length)))

    def load(self, state: Mapping[str, torch.Tensor]) -> None:
        unexpected = sorted(set(state) - self._names)
        if unexpected:
            raise SpliceError(
                f"the merged model has tensors the objective's model lacks, e.g. {unexpected[:3]}"
            )
        missing = [n for n in self._names - set(state) if not (self._tied[n] & set(state))]
        if missing:
            first = sorted(missing)[:3]
            raise SpliceError(
                f"the merged model lacks tensors of the objective's model, e.g. {first}"
            )
        self.model.load_state_dict(dict(state), strict=False)

    def __call__(self, state: Mapping[str, torch.Tensor]) -> float:
        self.load(state)
        self.calls += 1
        result: dict[str, Any] = evaluate_lm(self.model, self.batches)
        return float(result["loss"])
