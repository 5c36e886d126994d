"""The causal-LM pool's experts: one LoRA or full fine-tune per task, cached.

Training is ``splice train``'s causal-LM path, not a copy of it: the rows are
`splice.train.data.LMExample` (text: loss on every token; prompt + answer: loss on the
answer), batched by `splice.train.data.lm_batches` (seeded shuffle per epoch, right
padding) and trained by `splice.train.loop.fit` (AdamW, warm-up then linear decay,
gradient clipping) with the bench's ``training`` settings:

- ``full``: every weight trains at ``full.lr``;
- ``lora``: LoRA (`splice.adapters`) on ``lora.target_modules`` (Llama-style names:
  q_proj, v_proj, ...) at ``lora.lr``; the adapter is saved as a PEFT folder
  (``adapter/``, what the low-rank ``lora:NAME`` merges read) and folded into the weights.

The multi-task model (``baselines.multitask``, the pool's upper-bound reference): one
``full`` fine-tune, with the full experts' settings (``full.lr``, ``training``), on the
union of the tasks' train examples, task by task in config order and shuffled together
by `lm_batches` (seed ``training.seed + epoch``), so a batch mixes tasks (no heads to keep
apart, unlike the classifier pool's multi-task model). Steps:
``ceil(epochs × ceil(union / batch_size))`` — each epoch sees every example each expert
saw once; about the sum of the experts' steps (equal when every train part is a multiple
of the batch size).

An expert is an HF folder (``save_pretrained``: config.json + model.safetensors, tied
weights stored once, what the merge engine reads) + meta.json, under
``cache_root()/bench/lm-experts``; its key hashes the model's identity, the task's
examples and split, the kind and the training settings (`bench.experts.training_settings`).
The multi-task model's key hashes every task's identity, in order, and kind
``multitask``; it is cached beside the experts.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from splice.bench.cache import bench_root, content_key
from splice.bench.config import BenchConfig
from splice.bench.experts import ADAPTER_DIR, Expert, training_settings
from splice.bench.lm_tasks import LMTaskData
from splice.errors import SpliceError
from splice.io.output_folder import cache_folder
from splice.train.data import LMExample


def check_target_modules(model: torch.nn.Module, targets: list[str]) -> None:
    """Each LoRA target must name a linear module of the model (before any training)."""
    names = {
        n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
    }
    missing = [t for t in targets if t not in names]
    if missing:
        raise SpliceError(
            f"lora.target_modules {missing} name no linear module of this causal LM "
            f"(its linear modules: {sorted(names)}); e.g. target_modules: [q_proj, v_proj]"
        )


MULTITASK = "multitask"


def union_examples(tasks: list[LMTaskData]) -> list[LMExample]:
    """The multi-task model's training rows: every task's train part, in task order
    (`lm_batches` shuffles them together with the training seed)."""
    return [e for t in tasks for e in t.parts["train"]]


def train_lm_expert(
    folder: Path, task: LMTaskData, kind: str, cfg: BenchConfig, out: Path, progress: bool
) -> dict[str, Any]:
    """Train ``kind`` on ``task`` from the model at ``folder``; write it into ``out``."""
    train = task.parts["train"]
    summary = train_lm_model(folder, train, kind, cfg, out, progress)
    return {"kind": kind, "tasks": [task.name], "train_examples": len(train), **summary}


def train_lm_model(
    folder: Path, train: list[LMExample], kind: str, cfg: BenchConfig, out: Path, progress: bool
) -> dict[str, Any]:
    """Train ``kind`` (full | lora) on the rows ``train`` from the model at ``folder``; write
    it into ``out``; the training record (`FitResult.record`)."""
    from splice.train.data import lm_batches
    from splice.train.loop import fit
    from splice.train.models import load_for_task

    t = cfg.training
    torch.manual_seed(t.seed)
    model, tok, _ = load_for_task(str(folder), "causal_lm")
    trained: torch.nn.Module = model
    if kind == "lora":
        from splice.adapters import AdapterModel, make_config

        lo = cfg.lora
        check_target_modules(model, list(lo.target_modules))
        trained = AdapterModel(model)
        settings = {
            "r": lo.r,
            "lora_alpha": lo.alpha,
            "lora_dropout": lo.dropout,
            "target_modules": list(lo.target_modules),
        }
        trained.add_adapter("bench", make_config("lora", settings, where="lora"))
        lr = lo.lr
    else:
        lr = cfg.full.lr
    total = max(1, math.ceil(t.epochs * math.ceil(len(train) / t.batch_size)))
    summary = fit(
        trained,
        lambda epoch: lm_batches(train, tok, t.batch_size, t.max_length, t.seed + epoch),
        total,
        lr=lr,
        weight_decay=t.weight_decay,
        warmup_ratio=t.warmup_ratio,
        grad_clip=t.grad_clip,
        progress=progress,
    )
    if kind == "lora":
        from splice.adapters import save_adapter

        save_adapter(trained, out / ADAPTER_DIR, "bench", base_model_name_or_path=str(folder))
        model = trained.merge_and_unload()
    model.save_pretrained(out)
    return summary.record()


def lm_expert_key(
    identity: dict[str, Any], task: LMTaskData, kind: str, cfg: BenchConfig
) -> tuple[str, Path]:
    """The cache key of the ``kind`` expert of ``task`` and its folder (trained or not)."""
    key = content_key(
        {
            "pool": "lm",
            "model": identity,
            "task": task.identity(),
            "kind": kind,
            "training": training_settings(cfg, kind),
        }
    )
    return key, bench_root() / "lm-experts" / f"{kind}-{task.name}-{key[:16]}"


def lm_multitask_key(
    identity: dict[str, Any], tasks: list[LMTaskData], cfg: BenchConfig
) -> tuple[str, Path]:
    """The cache key of the multi-task model on ``tasks`` and its folder."""
    key = content_key(
        {
            "pool": "lm",
            "model": identity,
            "tasks": [t.identity() for t in tasks],
            "kind": MULTITASK,
            "training": training_settings(cfg, MULTITASK),  # the full experts' settings
        }
    )
    return key, bench_root() / "lm-experts" / f"{MULTITASK}-{len(tasks)}tasks-{key[:16]}"


def get_lm_expert(
    folder: Path,
    identity: dict[str, Any],
    task: LMTaskData,
    kind: str,
    cfg: BenchConfig,
    progress: bool = True,
) -> Expert:
    """The cached ``kind`` expert of ``task`` (trained on a cache miss)."""
    key, where = lm_expert_key(identity, task, kind, cfg)
    return _cached(
        where, key, kind, [task.name],
        lambda tmp: train_lm_expert(folder, task, kind, cfg, tmp, progress),
    )  # fmt: skip


def get_lm_multitask(
    folder: Path,
    identity: dict[str, Any],
    tasks: list[LMTaskData],
    cfg: BenchConfig,
    progress: bool = True,
) -> Expert:
    """The cached multi-task model on ``tasks`` (a full fine-tune on `union_examples`,
    trained on a cache miss)."""
    key, where = lm_multitask_key(identity, tasks, cfg)
    names = [t.name for t in tasks]

    def train(tmp: Path) -> dict[str, Any]:
        union = union_examples(tasks)
        summary = train_lm_model(folder, union, "full", cfg, tmp, progress)
        per_task = {t.name: len(t.parts["train"]) for t in tasks}
        return {
            "kind": MULTITASK,
            "tasks": names,
            "train_examples": len(union),
            "train_examples_per_task": per_task,
            **summary,
        }

    return _cached(where, key, MULTITASK, names, train)


def _cached(
    where: Path, key: str, kind: str, names: list[str], train: Callable[[Path], dict[str, Any]]
) -> Expert:
    """The model cached at ``where``, or ``train(tmp)`` (its meta) into it first."""
    if (where / "meta.json").is_file():
        meta = json.loads((where / "meta.json").read_text())
        return Expert(kind, names, where, {}, meta, cached=True)
    start = time.perf_counter()
    with cache_folder(where) as tmp:
        meta = train(tmp)
        meta["key"] = key
        meta["seconds_total"] = round(time.perf_counter() - start, 2)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return Expert(kind, names, where, {}, meta, cached=False)
