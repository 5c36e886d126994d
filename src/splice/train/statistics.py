"""Collect a model's merge statistics (diagonal Fisher or RegMean Gram matrices) on named
data, for `splice stats`: the safetensors file a recipe's ``statistics:`` entry reads.

    collect_statistics(StatsRequest(kind="gram", model="./expert_a", data="bbc_news",
                                    out="./expert_a.gram.safetensors"))

The model is an HF folder (or a packaged name, `splice.train.models.resolve_model`); its
``config.json`` ``architectures`` say what it is (``--task`` overrides):

- ``*ForSequenceClassification`` (``seq_cls``): the data are labelled texts (a built-in task
  or a .csv / .tsv / .jsonl file with ``text`` and ``label``). Each label must be a class of
  the model's head: matched by name against ``config.id2label``, or, when the file's labels
  are integers (``"0"``, ``"1"``, ...), used as head indices. The loss of an example is the
  cross-entropy of its label.
- ``*ForCausalLM`` (``causal_lm``): the data are texts (a file's ``text`` column, or
  ``prompt`` + ``completion`` with the loss on the completion only, as `splice train`; or a
  built-in task's texts). The loss of an example is the mean next-token negative
  log-likelihood of its target tokens (a mean, not a sum, so long and short examples weigh
  alike in the Fisher).

Which examples: ``split`` "train" / "validation" / "test" takes that part of the seeded
80/10/10 split `splice train` makes with the same seed (so an expert's statistics can be
collected on exactly its training examples), "all" every example; the default is "train"
for a built-in task and "all" for a file. ``max_examples`` then keeps the first N.

Everything the user gave is checked before the model runs: numbers, the output path (a
``.safetensors`` file; an existing file only with ``overwrite``), the data (readable,
non-empty, labels in the head), the exclusion patterns. Then the model is run batch by batch
(`splice.merge.data_stats.collect_fisher` / `collect_gram`, a tqdm bar with ``progress``).

Memory bound: the model, one batch (its activations; for Fisher also its autograd graph and
one gradient per parameter) and the running statistic: Fisher one float32 tensor per
trainable parameter (the model's size again), Gram one float32 d_in x d_in matrix per
``nn.Linear``. It does not grow with the number of batches. The file is written atomically
(`save_statistics`) with the kind, model, data and example count in its metadata.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from splice.errors import DataError, SpliceError
from splice.io.out_location import existing_ancestor

Kind = Literal["fisher", "gram"]
TASK_SUFFIXES = {"ForSequenceClassification": "seq_cls", "ForCausalLM": "causal_lm"}
SPLITS = ("all", "train", "validation", "test")


class StatsError(SpliceError):
    pass


@dataclass(frozen=True)
class StatsRequest:
    kind: Kind
    model: str
    data: str
    out: str | Path | None  # None: not written (`compute_statistics` returns them)
    task: str | None = None  # seq_cls | causal_lm; None: from config.json
    split: str | None = None  # None: "train" for a built-in task, "all" for a file
    seed: int = 0
    max_examples: int | None = None
    batch_size: int = 8
    max_length: int = 128
    per_example: bool = True  # Fisher: exact per-example squares (False: batch approximation)
    reduction: Literal["mean", "sum"] = "mean"  # Gram
    exclude: tuple[str, ...] = ()  # Gram: module-name patterns left out (e.g. the head)
    overwrite: bool = False
    progress: bool = True


@dataclass(frozen=True)
class StatsResult:
    path: Path
    kind: Kind
    task: str
    examples: int
    tensors: int
    bytes: int


@dataclass(frozen=True)
class PreparedStats:
    """A checked request with its data read (`prepare_statistics`); the model not loaded."""

    req: StatsRequest
    folder: Path
    task: str
    num_labels: int
    examples: tuple[Any, ...]  # seq_cls: (texts, labels); causal_lm: (rows,)
    n: int


def collect_statistics(req: StatsRequest) -> StatsResult:
    """Check ``req``, run the model over its data and write the statistics file."""
    from splice.merge.data_stats import save_statistics

    prepared = prepare_statistics(req)
    stats = compute_statistics(prepared)
    metadata = {
        "format": "splice-statistics",
        "kind": req.kind,
        "task": prepared.task,
        "model": str(prepared.folder),
        "data": str(req.data),
        "split": _split_of(req),
        "examples": str(prepared.n),
        "per_example": str(req.per_example).lower() if req.kind == "fisher" else "",
        "reduction": req.reduction if req.kind == "gram" else "",
    }
    assert req.out is not None
    out = Path(req.out)
    save_statistics(stats, out, {k: v for k, v in metadata.items() if v})
    size = sum(t.numel() * t.element_size() for t in stats.values())
    return StatsResult(out, req.kind, prepared.task, prepared.n, len(stats), size)


def prepare_statistics(req: StatsRequest) -> PreparedStats:
    """Every check of ``req`` (numbers, output path when ``out`` is set, model kind, data
    readable and non-empty, labels in the head) and its data read: all that can fail before
    the model runs. A recipe with ``data:`` entries prepares every model's request first."""
    from splice.numbers import check_number
    from splice.train.models import resolve_model

    if req.kind not in ("fisher", "gram"):
        raise StatsError(f"kind must be 'fisher' or 'gram', not {req.kind!r}")
    check_number(req.batch_size, "--batch-size", ge=1, integer=True, error=StatsError)
    check_number(req.max_length, "--max-length", ge=2, integer=True, error=StatsError)
    check_number(req.seed, "--seed", integer=True, error=StatsError)
    if req.max_examples is not None:
        check_number(req.max_examples, "--max-examples", ge=1, integer=True, error=StatsError)
    if req.split is not None and req.split not in SPLITS:
        raise StatsError(f"--split must be one of {list(SPLITS)}, not {req.split!r}")
    if req.reduction not in ("mean", "sum"):
        raise StatsError(f"--reduction must be 'mean' or 'sum', not {req.reduction!r}")
    if req.exclude and req.kind != "gram":
        raise StatsError("--exclude applies to gram statistics only (fisher covers every tensor)")
    for pattern in req.exclude:
        try:
            re.compile(pattern)
        except re.error as e:
            raise StatsError(f"--exclude {pattern!r} is not a regular expression: {e}") from None
    if req.out is not None:
        _check_out(Path(req.out), req.overwrite)
    folder = resolve_model(req.model)
    config = _config(folder)
    task = req.task or _task_of(config, folder)
    if task not in TASK_SUFFIXES.values():
        raise StatsError(f"--task must be seq_cls or causal_lm, not {task!r}")
    num_labels = int(config.get("num_labels") or len(config.get("id2label") or {}) or 2)
    if task == "seq_cls":
        texts, labels = _classification_data(req, config)
        return PreparedStats(req, folder, task, num_labels, (texts, labels), len(texts))
    lm_rows = _lm_data(req)
    return PreparedStats(req, folder, task, num_labels, (lm_rows,), len(lm_rows))


def compute_statistics(prepared: PreparedStats) -> dict[str, Tensor]:
    """Run the prepared request's model over its data, batch by batch: the statistics."""
    from splice.merge.data_stats import collect_fisher, collect_gram
    from splice.train.models import load_for_task

    req, task = prepared.req, prepared.task
    labels_n = prepared.num_labels if task == "seq_cls" else None
    model, tok, _ = load_for_task(req.model, task, labels_n)
    model.eval()
    if task == "seq_cls":
        from splice.train.data import cls_batches

        texts, labels = prepared.examples
        batches = cls_batches(texts, labels, tok, req.batch_size, req.max_length)
        loss_fn = classification_losses
    else:
        from splice.train.data import lm_batches, lm_encode

        (lm_rows,) = prepared.examples
        if req.kind == "fisher":
            for i, row in enumerate(lm_rows):
                if not any(t != -100 for t in lm_encode(row, tok, req.max_length)[1][1:]):
                    raise DataError(
                        f"example {i}: no completion token left within --max-length "
                        f"{req.max_length} (the prompt fills it); no loss to take a Fisher of"
                    )
        batches = lm_batches(lm_rows, tok, req.batch_size, req.max_length)
        loss_fn = lm_losses
    from tqdm.auto import tqdm

    bar = tqdm(
        batches,
        total=math.ceil(prepared.n / req.batch_size),
        desc=f"{req.kind} statistics",
        unit="batch",
        disable=not req.progress,
        leave=False,
    )
    if req.kind == "fisher":
        return collect_fisher(model, bar, loss_fn, per_example=req.per_example)
    return collect_gram(
        model, bar, forward=forward_inputs, reduction=req.reduction, exclude=req.exclude
    )


def _check_out(out: Path, overwrite: bool) -> Path:
    if out.suffix != ".safetensors":
        raise StatsError(
            f"--out {out}: give a .safetensors file name (e.g. model.gram.safetensors)"
        )
    if out.is_dir():
        raise StatsError(f"--out {out} is a folder; give a .safetensors file name")
    if out.exists() and not overwrite:
        raise StatsError(f"--out {out} exists; pass --overwrite to replace it")
    above = existing_ancestor(out)
    if not above.is_dir():
        raise StatsError(f"--out {out}: {above} is a file, not a folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


def _config(folder: Path) -> dict[str, Any]:
    from splice.io.textfile import load_json_object

    return load_json_object(folder / "config.json", StatsError)


def _task_of(config: dict[str, Any], folder: Path) -> str:
    archs = config.get("architectures") or []
    for arch in archs if isinstance(archs, list) else []:
        for suffix, task in TASK_SUFFIXES.items():
            if isinstance(arch, str) and arch.endswith(suffix):
                return task
    raise StatsError(
        f"{folder}: config.json architectures {archs} are neither a sequence classifier nor "
        "a causal LM; pass --task seq_cls or --task causal_lm"
    )


def _split_of(req: StatsRequest) -> str:
    from splice.data import TASKS

    if req.split is not None:
        return req.split
    return "train" if str(req.data) in TASKS else "all"


def _classification_data(req: StatsRequest, config: dict[str, Any]) -> tuple[list[str], list[int]]:
    from splice.data import load_task, make_splits

    ds = load_task(req.data)
    split = _split_of(req)
    if split != "all":
        ds = make_splits(ds, seed=req.seed).apply(ds)[split]
    head = _head_index(ds.label_names, config, str(req.data))
    texts = list(ds.texts)
    labels = [head[y] for y in ds.labels]
    if req.max_examples is not None:
        texts, labels = texts[: req.max_examples], labels[: req.max_examples]
    if not texts:
        raise DataError(f"{req.data}: no examples in the {split} split")
    return texts, labels


def _head_index(names: tuple[str, ...], config: dict[str, Any], where: str) -> list[int]:
    """The head's class index of each of the data's class names (see the module docstring)."""
    id2label = config.get("id2label") or {}
    size = int(config.get("num_labels") or len(id2label) or 2)
    by_name = {str(v): int(k) for k, v in id2label.items()} if isinstance(id2label, dict) else {}
    if all(n in by_name for n in names):
        return [by_name[n] for n in names]
    if all(n.isdigit() and int(n) < size for n in names):
        return [int(n) for n in names]
    unknown = [n for n in names if n not in by_name][:5]
    raise DataError(
        f"{where}: labels {unknown} are not classes of the model's head "
        f"({size} classes: {list(by_name)[:10]}); use the head's label names or indices "
        f"0..{size - 1}"
    )


def _lm_data(req: StatsRequest) -> list[Any]:
    from splice.data import TASKS
    from splice.train.data import LMExample, lm_examples_from_file

    split = _split_of(req)
    if str(req.data) in TASKS:
        from splice.data import load_task, make_splits

        ds = load_task(req.data)
        if split != "all":
            ds = make_splits(ds, seed=req.seed).apply(ds)[split]
        rows = [LMExample("", t) for t in ds.texts]
    else:
        rows = lm_examples_from_file(Path(req.data))
        if split != "all":  # the row split of `splice train` (splice.train.data.lm_splits)
            order = list(range(len(rows)))
            random.Random(req.seed).shuffle(order)
            k = max(1, round(0.1 * len(rows)))
            part = {"test": order[:k], "validation": order[k : 2 * k], "train": order[2 * k :]}
            rows = [rows[i] for i in part[split]]
    if req.max_examples is not None:
        rows = rows[: req.max_examples]
    if not rows:
        raise DataError(f"{req.data}: no examples in the {split} split")
    return rows


def _inputs(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v for k, v in batch.items() if k != "labels"}


def forward_inputs(model: nn.Module, batch: dict[str, Tensor]) -> Any:
    return model(**_inputs(batch))


def classification_losses(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    logits = model(**_inputs(batch)).logits
    return torch.nn.functional.cross_entropy(logits.float(), batch["labels"], reduction="none")


def lm_losses(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Per example: the mean next-token NLL over its target tokens (labels != -100)."""
    logits = model(**_inputs(batch)).logits[:, :-1].float()
    targets = batch["labels"][:, 1:]
    nll = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]),
        targets.reshape(-1),
        ignore_index=-100,
        reduction="none",
    ).view(targets.shape)
    counts = (targets != -100).sum(dim=1)
    return nll.sum(dim=1) / counts.clamp_min(1)


def entry_request(kind: str, model: str, d: Any, *, progress: bool = True) -> StatsRequest:
    """The `StatsRequest` of a recipe model's ``data:`` entry ``d``
    (`splice.recipe.schema.StatsData`) on ``model``, kept in memory (``out`` None)."""
    return StatsRequest(
        kind=kind,  # type: ignore[arg-type]
        model=model,
        data=d.source,
        out=None,
        split=d.split,
        seed=d.seed,
        max_examples=d.max_examples,
        batch_size=d.batch_size,
        max_length=d.max_length,
        per_example=d.per_example,
        progress=progress,
    )


def collect_data_entries(
    entries: list[tuple[int, Any]], kind: str, *, progress: bool = True
) -> dict[int, dict[str, Tensor]]:
    """A recipe's ``data:`` entries (index, `splice.recipe.schema.ModelEntry`) collected as
    ``kind`` statistics, in memory: every entry's request checked and its data read first,
    then the models run one at a time (`splice.engine.data_inputs`' collector; `splice merge`
    passes it to `plan_merge`). Errors name the entry: ``models[i].data (MODEL): ...``."""
    from splice.errors import MergeValidationError

    prepared: dict[int, PreparedStats] = {}
    for i, entry in entries:
        d = entry.data
        if "+" in entry.model and not Path(entry.model).exists():
            raise MergeValidationError(
                f"models[{i}].data: statistics are collected on an HF model folder, not on "
                f"{entry.model!r} (a model + LoRA reference); run `splice stats` on the "
                "merged-in folder and give `statistics:`"
            )
        req = entry_request(kind, entry.model, d, progress=progress)
        try:
            prepared[i] = prepare_statistics(req)
        except SpliceError as e:
            raise MergeValidationError(f"models[{i}].data ({entry.model}): {e}") from None
    return {i: compute_statistics(p) for i, p in prepared.items()}
