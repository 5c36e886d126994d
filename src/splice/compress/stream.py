"""Streaming compression of N fine-tuned checkpoints into a shared vector plus masks, and
restoring one task's model from it (see `splice.compress.packed` for the folder layout).

Both directions read one tensor at a time (`open_checkpoint`) and write through
`ShardedWriter` (atomic: nothing appears at the output path until it is complete), so peak
memory is a few copies of the largest tensor times the number of tasks.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor

import splice
from splice.compress.packed import (
    MANIFEST_NAME,
    Manifest,
    mask_name,
    pack_masks,
    packed_width,
    unpack_mask,
)
from splice.errors import MergeValidationError
from splice.io import CheckpointReader, ShardedWriter, plan_shards
from splice.io.base import TensorInfo
from splice.io.open import TOKENIZER_FILES, model_side_files
from splice.reference import open_checkpoint

DEFAULT_SHARD_BYTES = 2_000_000_000
MODEL_FILES = ("config.json", *TOKENIZER_FILES)


class Kernel(Protocol):
    """The per-tensor math of a compression method."""

    def __call__(self, base: Tensor, deltas: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        """(shared vector, per-task bool masks) for one tensor, from float32 task vectors."""
        ...

    def scales(self) -> list[float]:
        """Per-task restore scales s_t, asked once after every tensor was seen."""
        ...


@dataclass(frozen=True)
class CompressReport:
    out_dir: Path
    tensors: int
    bytes_written: int  # tensor data written (vector + packed masks)
    bytes_in: int  # tensor data of the N fine-tuned checkpoints
    seconds: float


def task_names(refs: Sequence[str]) -> list[str]:
    """Default task names: each model's folder or file stem, made unique with ``-<i>``."""
    stems = [Path(os.fspath(r).rstrip("/")).stem or f"task{i}" for i, r in enumerate(refs)]
    return [s if stems.count(s) == 1 else f"{s}-{i}" for i, s in enumerate(stems)]


def _check_inputs(base: CheckpointReader, models: list[CheckpointReader]) -> None:
    names = base.names()
    for m in models:
        missing = sorted(set(names) ^ set(m.names()))
        if missing:
            raise MergeValidationError(
                f"{m.path}: tensor names differ from the base {base.path}: "
                + ", ".join(missing[:3])
                + (" ..." if len(missing) > 3 else "")
            )
        for n in names:
            if m.info(n).shape != base.info(n).shape:
                raise MergeValidationError(
                    f"{m.path}: tensor '{n}' has shape {m.info(n).shape}, "
                    f"the base has {base.info(n).shape}"
                )


def compress(
    base_ref: str,
    model_refs: Sequence[str],
    out_dir: str | Path,
    kernel: Kernel,
    *,
    method: str,
    params: dict[str, object],
    names: Sequence[str] | None = None,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    overwrite: int | bool = False,
    allow_nonfinite: bool = False,
) -> CompressReport:
    """Compress the fine-tuned ``model_refs`` (all of the base's architecture) into
    ``out_dir``: per float tensor, the kernel's shared vector and packed task masks.
    NaN / ±inf in an input or the vector is a NonFiniteError unless ``allow_nonfinite``."""
    start = time.perf_counter()
    if len(model_refs) < 2:
        raise MergeValidationError(f"{method} compression needs at least 2 fine-tuned models")
    names = list(names) if names else task_names(model_refs)
    if len(names) != len(model_refs) or len(set(names)) != len(names):
        raise MergeValidationError("task names must be unique, one per model")
    check = not allow_nonfinite
    base = open_checkpoint(base_ref, check_finite=check)
    models = [open_checkpoint(r, check_finite=check) for r in model_refs]
    try:
        _check_inputs(base, models)
        floats = [n for n in base.names() if base.info(n).dtype.is_floating_point]
        passthrough = [n for n in base.names() if n not in set(floats)]
        plan: list[TensorInfo] = []
        for n in floats:
            info = base.info(n)
            plan.append(info)
            plan.append(
                TensorInfo(mask_name(n), (len(models), packed_width(info.numel)), torch.uint8)
            )
        writer = ShardedWriter(
            out_dir,
            plan_shards(plan, shard_bytes),
            {"format": "pt", "splice_version": splice.__version__, "splice_compress": method},
            overwrite=overwrite,
            inputs=[base_ref, *model_refs],
        )
        try:
            written = 0
            for n in floats:
                b = base.read(n).float()
                deltas = [m.read(n).float().sub_(b) for m in models]
                vector, masks = kernel(b, deltas)
                del deltas
                vector = vector.to(base.info(n).dtype).contiguous()
                packed = pack_masks(masks)
                writer.write(n, vector, allow_nonfinite=allow_nonfinite)
                writer.write(mask_name(n), packed)
                written += vector.nbytes + packed.nbytes
            manifest = Manifest(
                method=method,
                tasks=names,
                scales=[float(s) for s in kernel.scales()],
                base=os.path.abspath(os.fspath(base_ref)),
                params=params,
                passthrough=passthrough,
            )
            writer.finalize(extra_files={MANIFEST_NAME: manifest.to_json()})
        except BaseException:
            writer.abort()
            raise
        bytes_in = sum(m.info(n).nbytes for m in models for n in m.names())
    finally:
        for r in [base, *models]:
            r.close()
    return CompressReport(
        Path(out_dir), len(floats), written, bytes_in, time.perf_counter() - start
    )


def restore(
    folder: str | Path,
    task: str,
    out_dir: str | Path,
    *,
    base_ref: str | None = None,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    overwrite: int | bool = False,
    allow_nonfinite: bool = False,
) -> Path:
    """Write task ``task`` (name or index) of a compressed folder as a checkpoint folder:
    θ_t = base + s_t · (m_t ⊙ v), in the base's dtypes, with the base's config and
    tokenizer files. NaN / ±inf (inputs, output) are refused unless ``allow_nonfinite``."""
    manifest = Manifest.load(folder)
    t = manifest.task_index(task)
    scale = manifest.scales[t]
    base_ref = base_ref or manifest.base
    packed_reader = open_checkpoint(folder, check_finite=not allow_nonfinite)
    base = open_checkpoint(base_ref, check_finite=not allow_nonfinite)
    try:
        stored = set(packed_reader.names())
        keep = set(manifest.passthrough)
        for n in base.names():
            if n in keep:
                continue
            if n not in stored or mask_name(n) not in stored:
                raise MergeValidationError(f"{folder}: no task vector for base tensor '{n}'")
            if packed_reader.info(n).shape != base.info(n).shape:
                raise MergeValidationError(
                    f"{folder}: tensor '{n}' has shape {packed_reader.info(n).shape}, the base "
                    f"{base_ref} has {base.info(n).shape}"
                )
        infos = [base.info(n) for n in base.names()]
        copies = model_side_files(base_ref, MODEL_FILES)  # checked before any tensor is written
        writer = ShardedWriter(
            out_dir,
            plan_shards(infos, shard_bytes),
            {
                "format": "pt",
                "splice_version": splice.__version__,
                "splice_restored_task": manifest.tasks[t],
            },
            overwrite=overwrite,
            inputs=[folder, base_ref],
        )
        try:
            for info in infos:
                b = base.read(info.name)
                if info.name not in keep:
                    mask = unpack_mask(packed_reader.read(mask_name(info.name)), t, info.shape)
                    delta = packed_reader.read(info.name).float().mul_(mask)
                    if scale != 1:
                        delta.mul_(scale)
                    b = b.float().add_(delta).to(info.dtype)
                writer.write(info.name, b.contiguous(), allow_nonfinite=allow_nonfinite)
            writer.finalize(copy_files=copies)
        except BaseException:
            writer.abort()
            raise
    finally:
        packed_reader.close()
        base.close()
    return Path(out_dir)
