"""Evaluate backbones with per-task heads: features once per (backbone, split), then heads.

A backbone is loaded into one classifier skeleton; a forward pre-hook on its head module
captures the head's input (BERT: the dropout-ed pooled output; dropout is off in eval
mode) for every batch of every task. A task's accuracy is then its head applied to those
features. So each merged backbone costs one forward pass per example, whichever heads are
tried. Texts are tokenized once per split, in batches of similar length (sorted by
length: less padding, same results as any order).

This needs the head to be the classifier's last step (BERT, RoBERTa, DistilBERT); a model
that pools after its head (Llama's ``score`` reads every position) is refused, checked on
the first batch.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from splice.bench.backbone import Base, State, head_of
from splice.bench.precision import autocast
from splice.bench.tasks import TaskData
from splice.data import accuracy
from splice.errors import SpliceError
from splice.train.data import tokenize_batch

Features = list[torch.Tensor]  # one tensor per batch


@dataclass
class EncodedSplit:
    batches: list[dict[str, torch.Tensor]]
    labels: list[int]  # in batch order


def encode_split(
    texts: tuple[str, ...], labels: tuple[int, ...], tok: Any, batch_size: int, max_length: int
) -> EncodedSplit:
    """Tokenize once; batches of similar length (sorted by token count)."""
    if not texts:
        return EncodedSplit([], [])
    ids = tok(list(texts), truncation=True, max_length=max_length)["input_ids"]
    order = sorted(range(len(texts)), key=lambda i: (len(ids[i]), i))
    batches = [
        tokenize_batch(tok, [texts[i] for i in order[s : s + batch_size]], max_length)
        for s in range(0, len(order), batch_size)
    ]
    return EncodedSplit(batches, [labels[i] for i in order])


class Evaluator:
    """Holds the skeleton classifier and the encoded validation/test splits of each task."""

    def __init__(
        self,
        base: Base,
        tasks: list[TaskData],
        max_length: int,
        batch_size: int,
        splits: tuple[str, ...] = ("validation", "test"),
        precision: str = "float32",
    ):
        self.base = base
        self.precision = precision
        self.tasks = {t.name: t for t in tasks}
        self.model = base.fresh_model(tasks[0]).eval()
        self.max_length = max_length
        self.batch_size = batch_size
        self.encoded: dict[tuple[str, str], EncodedSplit] = {}
        for t in tasks:
            for split in splits:
                self.encoded[(t.name, split)] = self.encode(t, split)
        self._checked = False

    def encode(self, task: TaskData, split: str) -> EncodedSplit:
        part = task.parts[split]
        return encode_split(
            part.texts, part.labels, self.base.tokenizer, self.batch_size, self.max_length
        )

    def load_backbone(self, state: State) -> None:
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        prefix = self.base.head_name + "."
        if unexpected or any(not k.startswith(prefix) for k in missing):
            raise SpliceError(
                f"backbone does not fit the model: unexpected {unexpected[:3]}, "
                f"missing {[k for k in missing if not k.startswith(prefix)][:3]}"
            )

    @torch.no_grad()
    def features(self, enc: EncodedSplit) -> Features:
        """The head's inputs for every batch (the loaded backbone's features)."""
        captured: Features = []
        head = head_of(self.model, self.base.head_name)

        def hook(_module: nn.Module, args: tuple[Any, ...]) -> None:
            captured.append(args[0].detach().float())

        first_logits = None
        handle = head.register_forward_pre_hook(hook)
        try:
            for b in enc.batches:
                with autocast(self.precision):
                    logits = self.model(**b).logits.float()
                if first_logits is None:
                    first_logits = logits
        finally:
            handle.remove()
        if not self._checked and first_logits is not None:
            self._check(head, captured[0], first_logits)
        return captured

    def _check(self, head: nn.Module, feats: torch.Tensor, logits: torch.Tensor) -> None:
        again = head(feats)
        tol = 1e-5 if self.precision == "float32" else 5e-2
        if again.shape != logits.shape or not torch.allclose(again, logits, atol=tol, rtol=tol):
            raise SpliceError(
                "this classifier does more after its head (e.g. pools the positions), "
                "so per-task heads cannot be applied to cached features; splice bench "
                "supports encoder classifiers whose head is the last step (BERT-like)"
            )
        self._checked = True

    def head_module(self, task: str, state: State) -> nn.Module:
        head = copy.deepcopy(self.base.head_templates[task])
        head.load_state_dict(state)
        return head.eval()

    @torch.no_grad()
    def accuracy(self, task: str, split: str, feats: Features, head_state: State) -> float:
        head = self.head_module(task, head_state)
        preds = [int(p) for f in feats for p in head(f).argmax(-1).tolist()]
        return accuracy(preds, self.encoded[(task, split)].labels)

    def evaluate(
        self, backbone: State, heads: dict[str, State], split: str, tasks: list[str] | None = None
    ) -> dict[str, float]:
        """Accuracy per task of ``backbone`` with each task's head on ``split``."""
        self.load_backbone(backbone)
        out = {}
        for name in tasks or list(self.tasks):
            feats = self.features(self.encoded[(name, split)])
            out[name] = self.accuracy(name, split, feats, heads[name])
        return out


def train_probe_heads(
    ev: Evaluator, backbone: State, epochs: int = 200, lr: float = 1e-2, seed: int = 0
) -> dict[str, State]:
    """Linear-probe heads: the backbone frozen, each task's head trained on its training
    features (full batch AdamW, ``epochs`` steps from the seeded fresh head)."""
    ev.load_backbone(backbone)
    heads: dict[str, State] = {}
    for name, task in ev.tasks.items():
        enc = ev.encode(task, "train")
        feats = torch.cat(ev.features(enc))
        labels = torch.tensor(enc.labels)
        head = copy.deepcopy(ev.base.head_templates[name]).train()
        torch.manual_seed(seed)
        opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.0)
        for _ in range(epochs):
            loss = nn.functional.cross_entropy(head(feats), labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        heads[name] = {k: v.detach().clone() for k, v in head.state_dict().items()}
    return heads
