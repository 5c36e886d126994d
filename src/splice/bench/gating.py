"""The ``gate`` composition rows of `splice bench`: a trained gate over the frozen LoRA experts.

A `splice.compose.mixture.Mixture` (X-LoRA / MixLoRA family; what ``splice train --method
mixture`` trains) over every LoRA expert's saved adapter, on the pretrained classifier. At each
adapted layer, with g the gate's top-k renormalized softmax (`splice.compose.gate`):

    y = f(x) + Σ_i g_i (f_i(x) − f(x)) = W x + Σ_i g_i s_i B_i A_i x

- ``level: sequence``: one g per example from its base model's mean-pooled last hidden state
  (a first pass with the adapters off), the same g at every layer;
- ``level: token``: one gate per adapted layer, g per token from that layer's input.

Training, the multi-task baseline's protocol (`splice.bench.experts`): the union of the tasks'
training splits, each batch from one task, batches of all tasks shuffled together (seeded),
``gate.epochs`` passes (default ``training.epochs``); each batch is scored by its own task's
head, the LoRA expert's head, frozen (the labels of different tasks are different spaces, so a
task's loss needs its head). Only the gate trains (AdamW at ``gate.lr``, default
``training.head_lr``, warm-up and linear decay as the experts); the loss is the cross-entropy
plus ``balance_coef`` · the load-balancing loss (`splice.compose.balance`). At inference the
gate sees the example alone (no task id); the row is scored as every composition row, the
routed backbone with the true task's head. For the sequence gate, ``routing`` is the share of
each task's test examples whose most probable expert is their own.

Cached as the experts are (`splice.bench.cache`): one folder per level, keyed by the model, the
tasks' data, the experts' keys, the training settings, the precision and the gate settings;
it holds the mixture (`splice.compose.mixture_io`: ``mixture_config.json``,
``gate.safetensors``) and ``meta.json`` (training time, steps).
"""

from __future__ import annotations

import json
import math
import time
from typing import Any

import torch
from torch import nn

from splice.bench.backbone import TaskHeads
from splice.bench.cache import bench_root, content_key
from splice.bench.config import BenchConfig
from splice.bench.evaluate import Features
from splice.bench.experts import Expert, mixed_batches
from splice.bench.routing import RoutedModel, RoutedResult
from splice.bench.tasks import TaskData
from splice.compose.mixture import SEQUENCE_GATE, Mixture
from splice.compose.mixture_io import load_mixture, write_mixture_files
from splice.io.output_folder import cache_folder


def composition_key(
    routed: RoutedModel, pool: dict[str, Expert], cfg: BenchConfig, what: dict[str, Any]
) -> str:
    """The cache key of a model trained over the LoRA experts (a gate, a fusion): the model,
    its init seed, the tasks' data, the experts' own keys, the shared training settings, the
    precision and ``what`` (the row's own settings)."""
    base = routed.ev.base
    return content_key(
        {
            "model": base.identity,
            "init_seed": base.seed,
            "tasks": [t.identity() for t in routed.ev.tasks.values()],
            "experts": [e.meta.get("key", e.folder.name) for e in pool.values()],
            "training": cfg.training.model_dump(mode="json"),
            "precision": routed.ev.precision,
            **what,
        }
    )


def frozen_heads(routed: RoutedModel, heads: dict[str, dict]) -> dict[str, nn.Module]:
    out = {}
    for task, state in heads.items():
        head = routed.ev.head_module(task, state)
        for p in head.parameters():
            p.requires_grad_(False)
        out[task] = head
    return out


class _WithAuxLoss(nn.Module):
    """``net``'s forward with ``aux()`` added to its loss (a balance or fusion penalty)."""

    def __init__(self, net: nn.Module, aux: Any) -> None:
        super().__init__()
        self.net = net
        self._aux = aux

    def forward(self, **batch: Any) -> Any:
        out = self.net(**batch)
        extra = self._aux()
        if out.loss is not None and extra is not None:
            out.loss = out.loss + extra.to(out.loss.device)
        return out


def train_steps(tasks: list[TaskData], batch_size: int, epochs: float) -> int:
    per_epoch = sum(math.ceil(len(t.parts["train"]) / batch_size) for t in tasks)
    return max(1, math.ceil(epochs * per_epoch))


def get_gate(
    routed: RoutedModel,
    pool: dict[str, Expert],
    heads: dict[str, dict],
    cfg: BenchConfig,
    level: str,
    progress: bool = True,
) -> tuple[Mixture, dict[str, Any]]:
    """The cached gate of ``level`` over the experts on ``routed.am`` (trained on a miss),
    and its meta (``cached``: whether it was read from the cache)."""
    g = cfg.gate
    settings = {"level": level, "top_k": g.top_k, "balance_coef": g.balance_coef}
    settings |= {"lr": g.lr or cfg.training.head_lr, "epochs": g.epochs or cfg.training.epochs}
    key = composition_key(routed, pool, cfg, {"gate": settings})
    label = "+".join(pool) if len(pool) <= 2 else f"{len(pool)}tasks"
    folder = bench_root() / "gates" / f"gate-{level}-{label}-{key[:16]}"
    if (folder / "meta.json").is_file():
        meta = json.loads((folder / "meta.json").read_text())
        return load_mixture(routed.am, folder), {**meta, "cached": True}
    from splice.train.loop import fit

    tasks = list(routed.ev.tasks.values())
    t = cfg.training
    torch.manual_seed(t.seed)
    mixture = Mixture(
        routed.am,
        list(routed.adapter.values()),
        gate=level,  # type: ignore[arg-type]
        top_k=g.top_k,
        balance_coef=g.balance_coef,
    )
    frozen = frozen_heads(routed, heads)
    net = TaskHeads(mixture, routed.model, routed.ev.base.head_name, frozen, routed.ev.precision)

    def balance() -> torch.Tensor | None:
        return mixture.balance_coef * mixture.balance_loss() if mixture.balance_coef else None

    start = time.perf_counter()
    with cache_folder(folder) as tmp:
        summary = fit(
            _WithAuxLoss(net, balance),
            lambda epoch: mixed_batches(tasks, routed.ev.base.tokenizer, cfg, epoch),
            train_steps(tasks, t.batch_size, settings["epochs"]),
            lr=settings["lr"],
            weight_decay=t.weight_decay,
            warmup_ratio=t.warmup_ratio,
            grad_clip=t.grad_clip,
            param_groups=[{"params": mixture.gate_parameters(), "lr": settings["lr"]}],
            progress=progress,
        )
        mixture.eval()
        paths = {routed.adapter[task]: str(routed.folders[task]) for task in pool}
        write_mixture_files(mixture, tmp, paths)
        meta = {"key": key, **settings, **summary.record()}
        meta["seconds_total"] = round(time.perf_counter() - start, 2)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return mixture, {**meta, "cached": False}


def gate_result(routed: RoutedModel, mixture: Mixture, heads: dict[str, dict]) -> RoutedResult:
    """Each test example of the tasks of ``heads`` through the gate (no task id), scored with
    its task's head; ``routing`` (sequence gate): the share whose top expert is their own."""
    mixture.eval()
    test, routing, seconds = {}, {}, 0.0
    names = list(routed.adapter.values())
    for task in heads:
        enc = routed.ev.encoded[(task, "test")]
        own_index = names.index(routed.adapter[task])
        feats: Features = []
        own = 0
        for b in enc.batches:
            start = time.perf_counter()
            feats.append(routed.capture(lambda b=b: mixture(**b)))
            seconds += time.perf_counter() - start
            if mixture.gate_kind == "sequence":
                probs = mixture.last_routing[SEQUENCE_GATE].probs
                own += int((probs.argmax(-1) == own_index).sum())
        test[task] = routed.ev.accuracy(task, "test", feats, heads[task])
        routing[task] = own / max(1, len(enc.labels))
    sequence = mixture.gate_kind == "sequence"
    return RoutedResult(test, seconds, routing if sequence else None)


def gate_note(meta: dict[str, Any]) -> str:
    how = "from the cache" if meta.get("cached") else "trained now"
    return (
        f"gate trained on the union of the tasks' training data with each task's expert head, "
        f"{meta.get('steps')} steps, {meta.get('train_seconds')} s ({how}); no task id at "
        "inference"
    )
