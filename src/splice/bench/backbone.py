"""Backbone and heads: how a sequence classifier is split for merging.

A Hugging Face sequence classifier (BERT: ``bert`` incl. the pooler, dropout,
``classifier``) is split into the **backbone** (every tensor outside the head module
named by `splice.train.models.head_names`) and the **head** (that module). Merging merges
backbones; each task keeps its own head (the FusionBench protocol for GPT-2 on GLUE).

The pretrained backbone is written once per (model, seed) into the bench cache as an HF
folder (config.json + model.safetensors, keys as in the classifier's state dict minus the
head), the merge engine's ``base_model``. Every trained model starts from exactly those
tensors, so base and experts share any freshly initialized part (a missing pooler, say).
Heads start from a seeded initialization per task (``torch.manual_seed(seed)`` before
loading, as `splice train` does).
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from splice.bench.cache import bench_root, content_key, model_identity
from splice.bench.tasks import TaskData
from splice.errors import SpliceError
from splice.io.output_folder import cache_folder

State = dict[str, torch.Tensor]


@dataclass
class Base:
    """The pretrained backbone on disk, the tokenizer, and a seeded fresh head per task."""

    ref: str  # the model reference of the config (minilm, a folder)
    folder: Path  # the cached backbone folder (merge base)
    key: str  # content key of (model identity, seed)
    identity: dict[str, Any]
    head_name: str
    tokenizer: Any
    seed: int
    head_templates: dict[str, nn.Module] = field(default_factory=dict)

    def backbone_state(self) -> State:
        return load_file(self.folder / "model.safetensors")

    def fresh_model(self, task: TaskData) -> nn.Module:
        """The classifier for ``task``: the base backbone, the task's seeded fresh head."""
        from splice.train.models import load_for_task

        torch.manual_seed(self.seed)
        model, _, _ = load_for_task(self.ref, "seq_cls", task.num_classes, list(task.label_names))
        missing, unexpected = model.load_state_dict(self.backbone_state(), strict=False)
        if unexpected or any(not k.startswith(self.head_name + ".") for k in missing):
            raise SpliceError(f"base backbone does not fit {self.ref}: {unexpected or missing}")
        if task.name not in self.head_templates:
            self.head_templates[task.name] = copy.deepcopy(head_of(model, self.head_name))
        return model


def head_of(model: nn.Module, head_name: str) -> nn.Module:
    return getattr(model, head_name)


def split_state(model: nn.Module, head_name: str) -> tuple[State, State]:
    """(backbone, head) tensors of a classifier, detached copies."""
    backbone, head = {}, {}
    prefix = head_name + "."
    for k, v in model.state_dict().items():
        t = v.detach().clone().contiguous()
        if k.startswith(prefix):
            head[k[len(prefix) :]] = t
        else:
            backbone[k] = t
    return backbone, head


def save_backbone(folder: Path, state: State, config: Any) -> None:
    """An HF-style folder the merge engine reads: model.safetensors + config.json."""
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(config.to_json_string())


def save_heads(path: Path, heads: dict[str, State]) -> None:
    flat = {f"{task}/{k}": v.contiguous() for task, h in heads.items() for k, v in h.items()}
    save_file(flat, str(path))


def load_heads(path: Path) -> dict[str, State]:
    heads: dict[str, State] = {}
    for key, v in load_file(str(path)).items():
        task, name = key.split("/", 1)
        heads.setdefault(task, {})[name] = v
    return heads


def prepare_base(ref: str, seed: int) -> Base:
    """Resolve the model and write (once) its backbone into the bench cache."""
    import transformers
    from transformers import AutoTokenizer

    from splice.train.models import head_names, resolve_model

    folder = resolve_model(ref)
    identity = model_identity(folder)
    key = content_key({"model": identity, "seed": seed})
    out = bench_root() / "base" / key[:20]
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()  # one bar per weight load is noise
    tok = AutoTokenizer.from_pretrained(folder)
    if not (out / "model.safetensors").is_file():
        from splice.train.models import load_for_task

        torch.manual_seed(seed)
        model, _, _ = load_for_task(ref, "seq_cls", 2)
        names = head_names(model)
        if not names:
            raise SpliceError(f"{ref}: no classification head found (classifier / score)")
        backbone, _ = split_state(model, names[0])
        with cache_folder(out) as tmp:
            save_backbone(tmp, backbone, model.config)
            (tmp / "base.json").write_text(json.dumps({"head_name": names[0], "ref": ref}))
    head_name = json.loads((out / "base.json").read_text())["head_name"]
    return Base(ref, out, key, identity, head_name, tok, seed)


class TaskHeads(nn.Module):
    """A classifier whose head is switched per batch: ``forward(task=..., labels=...)``.

    ``model`` is the classifier (or an `AdapterModel` around it) and ``inner`` the plain
    classifier whose head attribute is swapped; the loss is the cross-entropy of the
    task's logits (computed here, so heads of different sizes share one model).
    """

    def __init__(
        self,
        model: nn.Module,
        inner: nn.Module,
        head_name: str,
        heads: dict,
        precision: str = "float32",
    ):
        super().__init__()
        self.precision = precision
        self.model = model
        self.heads = nn.ModuleDict(heads)
        self._inner = [inner]  # not a submodule: it is inside ``model``
        self.head_name = head_name

    def forward(self, task: str, labels: torch.Tensor | None = None, **batch: Any) -> Any:
        from splice.bench.precision import autocast

        setattr(self._inner[0], self.head_name, self.heads[task])
        with autocast(self.precision):
            logits = self.model(**batch).logits.float()
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return SimpleNamespace(loss=loss, logits=logits)
