"""The compressed multi-task folder: one shared task vector plus bit-packed per-task masks.

Layout (an ordinary safetensors checkpoint folder, written by `ShardedWriter`):

- ``<name>``: the shared task vector v of tensor ``<name>`` (τ_MTL for TALL, τ_uni for EMR),
  in the base tensor's dtype;
- ``__mask__.<name>``: uint8, shape (T, ⌈n/8⌉): row t is task t's bool mask of the n
  entries (flat row-major order), packed 8 per byte with ``np.packbits`` (big bit order:
  the first entry is the high bit);
- ``splice_compress.json``: the manifest (`Manifest`): method, task names, per-task
  scales s_t, the base reference, and the names of the tensors that carry no task vector
  (non-float tensors, copied from the base on restore).

Task t is restored as θ_t = base + s_t · (m_t ⊙ v), computed in float32 and cast to the
base dtype (s_t = 1 for TALL, the EMR rescaler λ_t for EMR).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from splice.errors import CheckpointError
from splice.io.safe_paths import member
from splice.io.textfile import load_json_object

MANIFEST_NAME = "splice_compress.json"
MASK_PREFIX = "__mask__."
FORMAT = "splice-multitask"
VERSION = 1


def mask_name(name: str) -> str:
    """The stored name of the packed masks of tensor ``name``."""
    return MASK_PREFIX + name


def packed_width(numel: int) -> int:
    """Bytes per task row for a tensor of ``numel`` entries."""
    return (numel + 7) // 8


def pack_masks(masks: list[torch.Tensor]) -> torch.Tensor:
    """T bool masks of one shape -> uint8 (T, ⌈n/8⌉), bits in flat order, high bit first."""
    rows = torch.stack([m.reshape(-1) for m in masks]).cpu().numpy()
    return torch.from_numpy(np.packbits(rows, axis=1))


def unpack_mask(packed: torch.Tensor, task: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Task ``task``'s bool mask of the given shape from the packed (T, ⌈n/8⌉) tensor."""
    numel = int(np.prod(shape, dtype=np.int64))
    row = np.unpackbits(packed[task].numpy(), count=numel)
    return torch.from_numpy(row.astype(bool)).reshape(shape)


@dataclass
class Manifest:
    """What `restore` needs besides the tensors."""

    method: str
    tasks: list[str]
    scales: list[float]
    base: str
    params: dict[str, object] = field(default_factory=dict)
    passthrough: list[str] = field(default_factory=list)
    format: str = FORMAT
    version: int = VERSION

    def to_json(self) -> bytes:
        return (json.dumps(asdict(self), indent=2) + "\n").encode()

    @classmethod
    def load(cls, folder: str | Path) -> Manifest:
        path = member(folder, MANIFEST_NAME)
        if path is None:
            raise CheckpointError(f"{folder}: not a compressed folder (no {MANIFEST_NAME})")
        try:
            manifest = cls(**load_json_object(path, CheckpointError))
        except (ValueError, TypeError) as e:
            raise CheckpointError(f"{path}: unreadable manifest: {e}") from None
        if manifest.format != FORMAT or manifest.version != VERSION:
            raise CheckpointError(
                f"{path}: format {manifest.format!r} version {manifest.version} "
                f"is not {FORMAT!r} version {VERSION}"
            )
        if len(manifest.scales) != len(manifest.tasks):
            raise CheckpointError(
                f"{path}: {len(manifest.tasks)} tasks but {len(manifest.scales)} scales"
            )
        return manifest

    def task_index(self, task: str) -> int:
        """A task by name, or by 0-based index given as digits; CheckpointError otherwise."""
        if task in self.tasks:
            return self.tasks.index(task)
        if task.isdigit() and int(task) < len(self.tasks):
            return int(task)
        raise CheckpointError(
            f"no task '{task}' in the compressed folder; tasks: "
            + ", ".join(f"{i}={t}" for i, t in enumerate(self.tasks))
        )
