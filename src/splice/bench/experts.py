"""The expert pool: one fine-tune per task and kind, and the multi-task reference; cached.

- ``full``: every backbone weight and the head train (AdamW; backbone at ``full.lr``).
- ``lora``: LoRA (splice.adapters) on ``lora.target_modules`` (MiniLM/BERT: query, value,
  PEFT's default for BERT) plus the head; after training the LoRA is saved as a PEFT
  adapter folder (``adapter/``, what the LoRA-native merge methods read) and folded into
  the weights, so the expert's backbone is a full checkpoint whose task vector is low-rank.
- ``multitask``: one backbone fine-tuned fully on the union of the tasks' training data,
  one head per task; each batch comes from one task, batches of all tasks shuffled
  together (seeded), so every task's data is seen ``epochs`` times as for its expert.

Heads train at ``training.head_lr`` (they start from scratch, so the backbone's small
rate would leave them underfit in a few hundred steps); warm-up then linear decay, as
`splice train`. An expert is one cache folder (`splice.bench.cache`): model.safetensors +
config.json (its backbone, what the merge engine reads), heads.safetensors, meta.json
(training time, steps, final loss) and, for a LoRA expert, adapter/.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from splice.bench.backbone import (
    Base,
    State,
    TaskHeads,
    head_of,
    load_heads,
    save_backbone,
    save_heads,
    split_state,
)
from splice.bench.cache import bench_root, content_key
from splice.bench.config import BenchConfig
from splice.bench.tasks import TaskData
from splice.io.output_folder import cache_folder

ADAPTER_DIR = "adapter"  # a LoRA expert's PEFT adapter folder, inside its cache folder


@dataclass
class Expert:
    """A trained model: its backbone folder and one head per task it was trained on."""

    kind: str  # full | lora | multitask
    tasks: list[str]
    folder: Path
    heads: dict[str, State]
    meta: dict[str, Any] = field(default_factory=dict)
    cached: bool = False


def training_settings(cfg: BenchConfig, kind: str) -> dict[str, Any]:
    """The settings that determine a trained model of ``kind`` (part of its cache key)."""
    from splice.bench.precision import resolve_precision

    out: dict[str, Any] = cfg.training.model_dump(mode="json")
    out["precision"] = resolve_precision(cfg.precision)
    if kind == "lora":
        out["lora"] = cfg.lora.model_dump(mode="json")
        out["saves"] = ADAPTER_DIR  # experts cached before adapters were kept are retrained
    else:
        out["full"] = cfg.full.model_dump(mode="json")
    return out


def expert_key(base: Base, tasks: list[TaskData], kind: str, cfg: BenchConfig) -> str:
    return content_key(
        {
            "model": base.identity,
            "init_seed": base.seed,
            "tasks": [t.identity() for t in tasks],
            "kind": kind,
            "training": training_settings(cfg, kind),
        }
    )


def _task_batches(task: TaskData, tok: Any, cfg: BenchConfig, seed: int) -> list[dict]:
    from splice.train.data import cls_batches

    part = task.parts["train"]
    t = cfg.training
    out = []
    for b in cls_batches(part.texts, part.labels, tok, t.batch_size, t.max_length, seed):
        b["task"] = task.name
        out.append(b)
    return out


def mixed_batches(tasks: list[TaskData], tok: Any, cfg: BenchConfig, epoch: int) -> Iterator:
    seed = cfg.training.seed + epoch
    batches = [b for t in tasks for b in _task_batches(t, tok, cfg, seed)]
    random.Random(seed).shuffle(batches)
    yield from batches


def train_model(
    base: Base,
    tasks: list[TaskData],
    kind: str,
    cfg: BenchConfig,
    progress: bool = True,
    adapter_dir: Path | None = None,
) -> tuple[State, dict[str, State], Any, dict[str, Any]]:
    """Train one model of ``kind`` on ``tasks``: (backbone, heads, config, meta). A LoRA
    model's adapter is also written as a PEFT adapter folder at ``adapter_dir``."""
    from splice.train.loop import fit

    t = cfg.training
    models = {task.name: base.fresh_model(task) for task in tasks}
    model = models[tasks[0].name]
    heads = {name: head_of(m, base.head_name) for name, m in models.items()}
    backbone_params: list[torch.nn.Parameter]
    wrapped: torch.nn.Module = model
    if kind == "lora":
        from splice.adapters import AdapterModel, make_config

        wrapped = AdapterModel(model)
        lo = cfg.lora
        wrapped.add_adapter(
            "bench",
            make_config(
                "lora",
                {
                    "r": lo.r,
                    "lora_alpha": lo.alpha,
                    "lora_dropout": lo.dropout,
                    "target_modules": list(lo.target_modules),
                },
                where="lora",
            ),
        )
        backbone_params = wrapped.adapter_parameters("bench")
        lr = lo.lr
    else:
        lr = cfg.full.lr
        head_ids = {id(p) for h in heads.values() for p in h.parameters()}
        backbone_params = [p for p in model.parameters() if id(p) not in head_ids]
    for h in heads.values():
        for p in h.parameters():
            p.requires_grad_(True)
    from splice.bench.precision import resolve_precision

    net = TaskHeads(wrapped, model, base.head_name, heads, resolve_precision(cfg.precision))
    n_train = sum(len(task.parts["train"]) for task in tasks)
    steps_per_epoch = sum(math.ceil(len(x.parts["train"]) / t.batch_size) for x in tasks)
    total = max(1, math.ceil(t.epochs * steps_per_epoch))
    groups = [
        {"params": backbone_params, "lr": lr},
        {"params": [p for h in heads.values() for p in h.parameters()], "lr": t.head_lr},
    ]
    torch.manual_seed(t.seed)
    summary = fit(
        net,
        lambda epoch: mixed_batches(tasks, base.tokenizer, cfg, epoch),
        total,
        lr=lr,
        weight_decay=t.weight_decay,
        warmup_ratio=t.warmup_ratio,
        grad_clip=t.grad_clip,
        param_groups=groups,
        progress=progress,
    )
    if kind == "lora":
        if adapter_dir is not None:
            from splice.adapters import save_adapter

            save_adapter(wrapped, adapter_dir, "bench", base_model_name_or_path=base.ref)
        wrapped.merge_and_unload()
    backbone, _ = split_state(model, base.head_name)
    head_states = {
        name: {k: v.detach().clone() for k, v in h.state_dict().items()}
        for name, h in heads.items()
    }
    meta = {
        "kind": kind,
        "tasks": [x.name for x in tasks],
        "train_examples": n_train,
        **summary.record(),
    }
    return backbone, head_states, model.config, meta


def expert_folder(base: Base, tasks: list[TaskData], kind: str, cfg: BenchConfig) -> Path:
    """Where the model of ``kind`` on ``tasks`` is cached (complete once meta.json exists)."""
    key = expert_key(base, tasks, kind, cfg)
    label = "+".join(x.name for x in tasks) if len(tasks) <= 2 else f"{len(tasks)}tasks"
    return bench_root() / "experts" / f"{kind}-{label}-{key[:16]}"


def get_expert(
    base: Base, tasks: list[TaskData], kind: str, cfg: BenchConfig, progress: bool = True
) -> Expert:
    """The cached model of ``kind`` on ``tasks`` (one task: an expert; several: the
    multi-task model), training it on a cache miss."""
    train_kind = "full" if kind == "multitask" else kind
    key = expert_key(base, tasks, kind, cfg)
    folder = expert_folder(base, tasks, kind, cfg)
    for task in tasks:  # the evaluator needs a head template per task
        if task.name not in base.head_templates:
            base.fresh_model(task)
    if (folder / "meta.json").is_file():
        meta = json.loads((folder / "meta.json").read_text())
        heads = load_heads(folder / "heads.safetensors")
        return Expert(kind, [x.name for x in tasks], folder, heads, meta, cached=True)
    start = time.perf_counter()
    with cache_folder(folder) as tmp:
        backbone, heads, config, meta = train_model(
            base, tasks, train_kind, cfg, progress, adapter_dir=tmp / ADAPTER_DIR
        )
        meta["kind"] = kind
        meta["key"] = key
        meta["seconds_total"] = round(time.perf_counter() - start, 2)
        save_backbone(tmp, backbone, config)
        save_heads(tmp / "heads.safetensors", heads)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return Expert(kind, [x.name for x in tasks], folder, heads, meta, cached=False)
