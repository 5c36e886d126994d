"""Composition rows of `splice bench`: the LoRA experts kept unmerged, chosen per example.

The merge rows fold every expert into one backbone. These rows keep the experts' saved
LoRA adapters (``adapter/`` of each LoRA expert) separate, loaded side by side into one
`AdapterModel` around the pretrained classifier, and give each test example its own
adapters through the mixed-adapter forward ``am(..., adapter_names=[one set per row])``
(`splice.adapters.mixed_batch`: at each adapted layer y = f(x) + Σ_i w_i ΔW_i x):

- ``oracle``: the task id is given; every example runs its own task's adapter alone. The
  upper bound of routing; it equals each expert on its own task (the expert's backbone is
  that adapter folded into the base) up to float rounding.
- ``retrieval``: no task id. Each example's set is chosen by embedding similarity to one
  centroid per expert (LoraRetriever / MOS; `splice.compose.retrieval`): the embedding is
  the pretrained backbone's mean-pooled, L2-normalised last hidden state of the example
  (`splice.compose.embedding.mean_pool`; with ``model: minilm`` that is exactly
  all-MiniLM-L6-v2's sentence embedding, splice's default retrieval embedder), a centroid is
  the mean embedding of the expert's training inputs (its task's training split), and the
  set is the top ``retrieval.k`` experts by cosine with weights softmax(cos / temperature).
- ``lorahub``: per task, LoraHub's weights of all the experts (`splice.compose.lorahub`:
  the factors summed, A = Σ w_i A_i, B = Σ w_i s_i B_i; CMA-ES on ``lorahub.examples``
  validation examples of the task with its head, ``lorahub.budget`` evaluations); the task's
  test split runs its one composed adapter (the task id given, as for the merges' heads).

Heads: every expert has its own classification head and label space, so a routed row is
scored as the merge rows are, with the *true task's head* on the routed backbone's
features ("routed backbone + true task head"). Routing quality itself is reported apart:
per task, the fraction of test examples whose top-1 retrieved expert is their own task's
(``routing`` of the row); predicting with the top-1 expert's head instead would turn every
misrouted example into an error (another task's labels), i.e. accuracy ≤ that fraction.

Inference cost: the seconds of the row's forward passes over every task's test split,
divided by the seconds of the plain pretrained classifier's forward over the same batches,
measured in the same run before and after the rows (their mean). The retrieval embedding
pass is included; the centroids and LoraHub's search are done once, offline, and are not;
LoraHub's composed adapter is timed as it runs here, unfolded (folded, it would cost 1). A
merged backbone has the base's architecture, so the merge rows' cost is 1 by construction.
Nothing here trains a parameter, so nothing is cached: the adapters are the cached LoRA
experts', and a LoraHub search is ``budget`` forward passes over a few examples per task. The
rows that train over these adapters, cached, are `splice.bench.gating` (a trained gate) and
`splice.bench.fusing` (AdapterFusion).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from splice.adapters import AdapterModel, load_adapter
from splice.bench.backbone import State, head_of
from splice.bench.evaluate import Evaluator, Features
from splice.bench.experts import ADAPTER_DIR, Expert
from splice.bench.precision import autocast
from splice.compose.embedding import mean_pool
from splice.compose.library import compute_centroid
from splice.compose.lorahub import LoraExperts, LoraHubObjective, lorahub_search
from splice.compose.retrieval import cosine_similarities, sets_from_scores
from splice.train.data import tokenize_batch

AdapterSet = str | dict[str, float]  # one row's adapter_names entry


@dataclass(frozen=True)
class RoutedResult:
    """A composition row's test accuracy per task, the seconds of its forward passes and,
    for retrieval, the fraction of each task's examples whose top-1 expert is their own;
    for LoraHub, each task's weights of the experts."""

    test: dict[str, float]
    seconds: float
    routing: dict[str, float] | None = None
    weights: dict[str, dict[str, float]] | None = None


class RoutedModel:
    """The pretrained classifier with every LoRA expert's adapter loaded (unmerged)."""

    def __init__(self, ev: Evaluator, experts: dict[str, Expert]):
        self.ev = ev
        first = ev.tasks[next(iter(experts))]
        self.model = ev.base.fresh_model(first).eval()
        self.am = AdapterModel(self.model).eval()
        # adapter names of our own: task names need not be valid adapter names
        self.adapter = {task: f"expert{i}" for i, task in enumerate(experts)}
        self.folders = {task: e.folder / ADAPTER_DIR for task, e in experts.items()}
        for task, folder in self.folders.items():
            load_adapter(self.am, folder, self.adapter[task], activate=False)

    @torch.no_grad()
    def features(
        self, batch: dict[str, torch.Tensor], sets: list[AdapterSet] | None
    ) -> torch.Tensor:
        """The head's input for one batch, row r running ``sets[r]`` (None: the active
        adapters for every row)."""
        return self.capture(lambda: self.am(**batch, adapter_names=sets))

    @torch.no_grad()
    def capture(self, forward: Callable[[], Any]) -> torch.Tensor:
        """The head's input during ``forward()`` (a forward of this model; the trained rows
        run it through a gate or a fusion)."""
        captured: list[torch.Tensor] = []

        def hook(_module: Any, args: tuple[Any, ...]) -> None:
            captured.append(args[0].detach().float())

        handle = head_of(self.model, self.ev.base.head_name).register_forward_pre_hook(hook)
        try:
            with autocast(self.ev.precision):
                forward()
        finally:
            handle.remove()
        return captured[-1]

    @torch.no_grad()
    def embed(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(rows, hidden) unit embeddings by the pretrained backbone (adapters off)."""
        with self.am.disabled(), autocast(self.ev.precision):
            out = self.am(**batch, output_hidden_states=True)
        return mean_pool(out.hidden_states[-1].float(), batch["attention_mask"])

    def centroids(self) -> torch.Tensor:
        """(experts, hidden): each expert's mean training-input embedding."""
        rows = []
        for task in self.adapter:
            enc = self.ev.encode(self.ev.tasks[task], "train")
            rows.append(compute_centroid(torch.cat([self.embed(b) for b in enc.batches])))
        return torch.stack(rows)

    def oracle(self, heads: dict[str, State]) -> RoutedResult:
        """Each example with its own task's adapter alone (the task id given)."""
        test, seconds = {}, 0.0
        for task in heads:
            enc = self.ev.encoded[(task, "test")]
            start = time.perf_counter()
            feats = [self.features(b, [self.adapter[task]] * _rows(b)) for b in enc.batches]
            seconds += time.perf_counter() - start
            test[task] = self.ev.accuracy(task, "test", feats, heads[task])
        return RoutedResult(test, seconds)

    def retrieval(
        self, heads: dict[str, State], centroids: torch.Tensor, k: int, temperature: float
    ) -> RoutedResult:
        """Each example of the tasks of ``heads`` with the top-k experts by similarity to
        ``centroids`` (one row per expert, `centroids`; module docstring)."""
        names = list(self.adapter.values())
        test, routing, seconds = {}, {}, 0.0
        for task in heads:
            enc = self.ev.encoded[(task, "test")]
            feats: Features = []
            own = 0
            start = time.perf_counter()
            for b in enc.batches:
                sims = cosine_similarities(self.embed(b), centroids)
                sets = sets_from_scores(sims, names, k, temperature)
                feats.append(self.features(b, list(sets)))
                own += sum(next(iter(s)) == self.adapter[task] for s in sets)
            seconds += time.perf_counter() - start
            test[task] = self.ev.accuracy(task, "test", feats, heads[task])
            routing[task] = own / max(1, len(enc.labels))
        return RoutedResult(test, seconds, routing)

    def lorahub(
        self, heads: dict[str, State], examples: int, budget: int, seed: int
    ) -> RoutedResult:
        """Per task, LoraHub's weights of all the experts (CMA-ES, ``budget`` evaluations,
        `splice.compose.lorahub`) on ``examples`` of its validation examples (a seeded
        sample) scored with its own head; its test split then runs that one composed adapter
        (the task id given). The search is not part of the timed forward."""
        experts = LoraExperts.load(list(self.folders.values()))
        tok, max_length = self.ev.base.tokenizer, self.ev.max_length
        test, weights, seconds = {}, {}, 0.0
        for task in heads:
            setattr(self.model, self.ev.base.head_name, self.ev.head_module(task, heads[task]))
            part = self.ev.tasks[task].parts["validation"]
            chosen = sorted(random.Random(seed).sample(range(len(part)), min(examples, len(part))))
            batch = tokenize_batch(tok, [part.texts[i] for i in chosen], max_length)
            batch["labels"] = torch.tensor([part.labels[i] for i in chosen])
            found = lorahub_search(self.am, experts, [batch], budget=budget, seed=seed)
            weights[task] = dict(zip(self.adapter, found.weights, strict=True))
            composed = LoraHubObjective(self.am, experts, [batch])  # active while it lives
            try:
                composed.set_weights(found.weights)
                enc = self.ev.encoded[(task, "test")]
                start = time.perf_counter()
                feats = [self.features(b, None) for b in enc.batches]
                seconds += time.perf_counter() - start
            finally:
                composed.remove()
            test[task] = self.ev.accuracy(task, "test", feats, heads[task])
        return RoutedResult(test, seconds, weights=weights)


def base_forward_seconds(ev: Evaluator, base_state: State) -> float:
    """Seconds of the plain pretrained classifier's forward over every task's test split
    (the reference of the relative inference cost)."""
    ev.load_backbone(base_state)
    start = time.perf_counter()
    for task in ev.tasks:
        ev.features(ev.encoded[(task, "test")])
    return time.perf_counter() - start


def _rows(batch: dict[str, torch.Tensor]) -> int:
    return int(batch["input_ids"].shape[0])
