"""Streaming compression of N fine-tuned checkpoints into a shared vector plus masks, and
restoring one task's model from it (see `splice.compress.packed` for the folder layout).

Both directions are per-tensor functions on the streaming driver (`splice.engine.driver`):
one tensor at a time in, `ShardedWriter` out (atomic: nothing appears at the output path
until it is complete), so peak memory is a few copies of the largest tensor times the number
of tasks. A kernel's whole-model statistic (EMR's rescaler sums) is answered in the same
pass: each tensor's share is kept by tensor and reduced in tensor order after the last one,
so the scales do not depend on the order the steps ran in.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor

from splice.compress.packed import (
    MANIFEST_NAME,
    Manifest,
    mask_name,
    pack_masks,
    packed_width,
    unpack_mask,
)
from splice.engine.driver import Output, Sources, Stream, side_files, write_stream
from splice.errors import CheckpointError, MergeValidationError
from splice.io.base import TensorInfo

DEFAULT_SHARD_BYTES = 2_000_000_000


class Kernel(Protocol):
    """The per-tensor math of a compression method, and its whole-model restore scales."""

    def __call__(
        self, base: Tensor, deltas: list[Tensor]
    ) -> tuple[Tensor, list[Tensor], Sequence[float]]:
        """(shared vector, per-task bool masks, this tensor's share of the whole-model
        statistic) for one tensor, from float32 task vectors."""
        ...

    def scales(self, shares: list[Sequence[float]]) -> list[float]:
        """Per-task restore scales s_t from every tensor's share, in tensor order."""
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


def write_compressed(
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
    if len(model_refs) < 2:
        raise MergeValidationError(f"{method} compression needs at least 2 fine-tuned models")
    names = list(names) if names else task_names(model_refs)
    if len(names) != len(model_refs) or len(set(names)) != len(names):
        raise MergeValidationError("task names must be unique, one per model")
    with Sources.open([base_ref, *model_refs], allow_nonfinite=allow_nonfinite) as src:
        base = src[base_ref]
        for r in model_refs:
            src.check_same_tensors(base_ref, r, f"model '{r}'")
        floats = [n for n in base.names() if base.info(n).dtype.is_floating_point]
        outputs: list[TensorInfo] = []
        for n in floats:
            info = base.info(n)
            width = packed_width(info.numel)
            outputs += [info, TensorInfo(mask_name(n), (len(model_refs), width), torch.uint8)]

        shares: dict[int, Sequence[float]] = {}

        def step(i: int) -> list[Output]:
            n = floats[i]
            b = src.read(base_ref, n).float()
            deltas = [src.read(r, n).float().sub_(b) for r in model_refs]
            vector, masks, shares[i] = kernel(b, deltas)
            vector = vector.to(base.info(n).dtype).contiguous()
            return [Output(n, vector), Output(mask_name(n), pack_masks(masks))]

        def manifest() -> dict[str, bytes]:
            m = Manifest(
                method=method,
                tasks=names,
                scales=[float(s) for s in kernel.scales([shares[i] for i in sorted(shares)])],
                base=os.path.abspath(os.fspath(base_ref)),
                params=params,
                passthrough=[n for n in base.names() if n not in set(floats)],
            )
            return {MANIFEST_NAME: m.to_json()}

        spec = Stream(
            outputs=outputs,
            step_outputs=[[n, mask_name(n)] for n in floats],
            metadata={
                "splice_compress": method,
            },
            shard_bytes=shard_bytes,
            overwrite=overwrite,
            allow_nonfinite=allow_nonfinite,
        )
        report = write_stream(out_dir, spec, src, step, extra_files=manifest)
        bytes_in = sum(src[r].info(n).nbytes for r in model_refs for n in src[r].names())
    return CompressReport(
        Path(out_dir), len(floats), report.bytes_written, bytes_in, report.seconds
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
    from splice.compress.registry import get_compression_method

    manifest = Manifest.load(folder)
    try:
        get_compression_method(manifest.method, "checkpoints")  # a method we know
    except MergeValidationError as e:
        raise CheckpointError(f"{folder}: written by an {e}") from None
    t = manifest.task_index(task)
    scale = manifest.scales[t]
    base_ref = base_ref or manifest.base
    folder = os.fspath(folder)
    with Sources.open([folder, base_ref], allow_nonfinite=allow_nonfinite) as src:
        packed, base = src[folder], src[base_ref]
        stored = set(packed.names())
        keep = set(manifest.passthrough)
        for n in base.names():
            if n in keep:
                continue
            if n not in stored or mask_name(n) not in stored:
                raise MergeValidationError(f"{folder}: no task vector for base tensor '{n}'")
            if packed.info(n).shape != base.info(n).shape:
                raise MergeValidationError(
                    f"{folder}: tensor '{n}' has shape {packed.info(n).shape}, the base "
                    f"{base_ref} has {base.info(n).shape}"
                )
        infos = [base.info(n) for n in base.names()]

        def step(i: int) -> list[Output]:
            info = infos[i]
            b = src.read(base_ref, info.name)
            if info.name not in keep:
                mask = unpack_mask(src.read(folder, mask_name(info.name)), t, info.shape)
                delta = src.read(folder, info.name).float().mul_(mask)
                if scale != 1:
                    delta.mul_(scale)
                b = b.float().add_(delta).to(info.dtype)
            return [Output(info.name, b.contiguous())]

        spec = Stream(
            outputs=infos,
            metadata={
                "splice_restored_task": manifest.tasks[t],
            },
            shard_bytes=shard_bytes,
            overwrite=overwrite,
            allow_nonfinite=allow_nonfinite,
            side_files=side_files(base_ref),  # checked before any tensor is written
        )
        write_stream(out_dir, spec, src, step)
    return Path(out_dir)
