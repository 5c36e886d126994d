"""The ``twin_merging`` rows of `splice bench`: Twin-Merging (`splice.compose.twin_merging`)
of each kind's experts, one row per kind (full and LoRA).

Per kind, with the experts' backbones θ_1..θ_T (a LoRA expert's: its adapter folded in):

1. shared knowledge θ*: ``twin.shared`` merged by the engine (`bench.merging`; default
   Task Arithmetic with λ = 0.3, the paper's 0.29 rounded to the bench's λ grid);
2. exclusive knowledge: per task and Linear weight matrix of the backbone, the truncated SVD
   of θ_t − θ* at rank ⌊min(m, n) · ``twin.fraction``⌋ (or ``twin.rank``), loaded as one LoRA
   adapter per task on the shared model; the other tensors (biases, LayerNorm, embeddings)
   are θ*'s. A LoRA expert's θ_t − θ* lives on its target modules and has rank at most
   T · r, so the default rank (38 on MiniLM's 384-wide matrices) keeps it whole when
   T · r ≤ 38;
3. router: the official MLP (`TwinRouter`) on the shared model's mean-pooled embedding
   (``twin.router_features``: ``last``, the paper's last hidden state, or ``layers``, every
   layer's, concatenated: `TwinMerging.embed`),
   trained to predict the task on every task's training split (``twin.router_split``
   ``train``, the default: the official script embeds up to 5,500 training examples per
   task; on the eight-task pool it routes 3–11 points more test examples to their own task
   than the validation split) or its *validation* split (``validation``: the paper's text
   says a small validation set), ``twin.epochs`` epochs of batches of ``twin.batch_size``
   (the official batch of 1,024 over ~44k examples makes ~2,150 steps; the bench's few
   hundred validation examples need smaller batches for the same number of epochs to train
   it: 50 × ⌈800 / 64⌉ = 650 steps on the 4-task run);
4. test: each example runs θ* + Σ_t w_t(x) τ̂_t with w = softmax of the router's logits, in
   one mixed-adapter forward per batch, scored with the true task's head (as every
   composition row). ``routing`` is the share of each task's test examples whose largest
   weight is their own task's.

Inference cost: seconds of the row's test forwards, router included (its embedding pass
over the shared model and the MLP), over the plain pretrained classifier's on the same
batches (`bench.routing.base_forward_seconds`). The merge, the SVDs and the router's
training are done once, offline, and are not counted; they are in the row's note.
Every example has its own weights, so each row of a batch is its own segment of the
mixed-adapter forward: on a small model that per-row work sets the cost.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from splice.adapters.targeting import is_linear, named_base_modules
from splice.bench.backbone import State
from splice.bench.config import TwinSettings
from splice.bench.evaluate import Evaluator, Features
from splice.bench.experts import Expert
from splice.bench.merging import merge_backbones
from splice.bench.precision import autocast
from splice.bench.routing import RoutedModel
from splice.compose.twin_merging import TwinMerging, exclusive_knowledge, train_router


@dataclass(frozen=True)
class TwinResult:
    test: dict[str, float]
    seconds: float  # the test forwards, router included
    routing: dict[str, float]  # per task: share of test examples routed top-1 to it
    kept: float  # share of Σ_t ‖θ_t − θ*‖² (Linear weights) the compressed τ̂_t keep
    setup_seconds: float  # merge + SVDs + router training (offline)
    router_examples: int
    router_validation: float  # the router's accuracy on its own training (validation) data


class _TwinModel(RoutedModel):
    """`RoutedModel`'s feature capture on the twin's model (adapters: the exclusives)."""

    def __init__(self, ev: Evaluator, twin: TwinMerging):  # no RoutedModel.__init__: no
        self.ev, self.am, self.model = ev, twin.am, twin.am.model  # expert adapters to load


def run_twin(
    ev: Evaluator,
    base_folder: Path,
    pool: dict[str, Expert],
    s: TwinSettings,
    heads: dict[str, State],
    seed: int,
) -> TwinResult:
    """Twin-Merging of ``pool`` (one expert per task) scored on every task's test split."""
    start = time.perf_counter()
    tasks = list(pool)
    shared, _ = merge_backbones(
        s.shared, s.shared_params, base_folder, [e.folder for e in pool.values()], seed=seed
    )
    model = ev.base.fresh_model(ev.tasks[tasks[0]]).eval()
    names = [
        f"{p}.weight"
        for p, m in named_base_modules(model)
        if p and is_linear(m) and f"{p}.weight" in shared
    ]
    exclusive, total, kept = {}, 0.0, 0.0
    for task, e in pool.items():
        expert = load_file(str(e.folder / "model.safetensors"))
        fraction = None if s.rank else s.fraction
        ex = exclusive_knowledge(shared, expert, rank=s.rank, fraction=fraction, names=names)
        exclusive[task] = ex
        total += sum(float((expert[n].float() - shared[n].float()).square().sum()) for n in names)
        kept += sum(float(ex[n].to_dense().square().sum()) for n in names)
    twin = TwinMerging.build(
        model, exclusive, shared=shared, top_k=s.top_k, features=s.router_features
    )
    captured = _TwinModel(ev, twin)
    embeddings, ids = [], []
    for i, task in enumerate(tasks):
        key = (task, s.router_split)
        enc = ev.encoded[key] if key in ev.encoded else ev.encode(ev.tasks[task], s.router_split)
        for b in enc.batches:
            with autocast(ev.precision):
                embeddings.append(twin.embed(b))
            ids += [i] * int(b["input_ids"].shape[0])
    x, y = torch.cat(embeddings), torch.tensor(ids)
    twin.router = train_router(
        x,
        y,
        len(tasks),
        epochs=s.epochs,
        lr=s.lr,
        batch_size=s.batch_size,
        hidden=twin.router_hidden(x.shape[1]),
        seed=s.seed,
    )
    with torch.no_grad():
        fit = float((twin.router(x).argmax(-1) == y).float().mean())
    setup = time.perf_counter() - start
    test, routing, seconds = {}, {}, 0.0
    for i, task in enumerate(tasks):
        enc = ev.encoded[(task, "test")]
        feats: Features = []
        own = 0
        t0 = time.perf_counter()
        for b in enc.batches:
            with autocast(ev.precision):
                w = twin.weights(b)
            feats.append(captured.features(b, list(twin.adapter_sets(w))))
            own += int((w.argmax(-1) == i).sum())
        seconds += time.perf_counter() - t0
        test[task] = ev.accuracy(task, "test", feats, heads[task])
        routing[task] = own / max(1, len(enc.labels))
    return TwinResult(test, seconds, routing, kept / total if total else 1.0, setup, len(y), fit)


_FEATURES = {
    "last": "the shared model's mean-pooled last hidden state",
    "layers": "the shared model's mean-pooled hidden states of every layer",
}


def twin_note(r: TwinResult, s: TwinSettings) -> str:
    """The row's note: how it was made, in words."""
    rank = f"rank {s.rank}" if s.rank else f"rank ⌊min(m, n) · {s.fraction}⌋"
    weights = f"top-{s.top_k} renormalized softmax" if s.top_k else "softmax"
    return (
        f"Twin-Merging: shared = {s.shared} {s.shared_params}; exclusive = θ_t − θ* per "
        f"Linear weight at {rank} (keeps {100 * r.kept:.1f}% of Σ‖θ_t − θ*‖²; biases, "
        f"LayerNorm, embeddings shared); router MLP trained on {r.router_examples} "
        f"{s.router_split} examples (fits {100 * r.router_validation:.1f}% of them) from "
        f"{_FEATURES[s.router_features]}, per-example "
        f"{weights} weights; offline setup {r.setup_seconds:.1f} s"
    )
