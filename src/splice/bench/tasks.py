"""The benchmark's tasks: loaded, split (seeded, stratified, class-balanced caps), identified.

Each task is a built-in name or a user data file (`splice.data.load_task`; a missing
source is an error saying how to install it). The split is `splice.data.make_splits`'s
80/10/10 with a per-class cap for each part, ``min(per_class, ceil(max / classes))``:
a task with many classes gets fewer examples per class, so no task dominates the run's
time and every part stays balanced (chance accuracy 1/classes, up to classes with fewer
examples than the cap).

A task's identity (the expert cache key's data part) is its content hash and a hash of
the split indices, so changing the data, the seed or a cap retrains its experts.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from splice.bench.config import DataSizes
from splice.data import SPLIT_NAMES, Splits, TextClassificationDataset, load_task, make_splits


@dataclass(frozen=True)
class TaskData:
    """One task's three parts and what identifies them."""

    name: str  # display name: the built-in name, or a file's stem
    ref: str  # what load_task was given
    label_names: tuple[str, ...]
    parts: dict[str, TextClassificationDataset]
    splits: Splits

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    def identity(self) -> dict[str, Any]:
        """Content hash of the data, hash of the split indices, label names."""
        indices = {n: list(self.splits.indices(n)) for n in SPLIT_NAMES}
        blob = json.dumps(indices, separators=(",", ":")).encode()
        return {
            "data_hash": self.splits.data_hash,
            "splits_hash": hashlib.sha256(blob).hexdigest(),
            "label_names": list(self.label_names),
        }

    def sizes(self) -> dict[str, int]:
        return {n: len(self.parts[n]) for n in SPLIT_NAMES}


def per_class_caps(sizes: DataSizes, num_classes: int) -> dict[str, int]:
    """The per-class cap of each part: min(per_class, ceil(max / classes))."""
    k = max(1, num_classes)
    return {
        "train": min(sizes.train_per_class, math.ceil(sizes.train_max / k)),
        "validation": min(sizes.validation_per_class, math.ceil(sizes.validation_max / k)),
        "test": min(sizes.test_per_class, math.ceil(sizes.test_max / k)),
    }


def display_name(ref: str) -> str:
    path = Path(ref)
    return path.stem if path.suffix else ref


def prepare_task(ref: str, sizes: DataSizes) -> TaskData:
    """Load ``ref`` and split it (see the module docstring)."""
    ds = load_task(ref)
    splits = make_splits(
        ds, seed=sizes.split_seed, max_per_class=per_class_caps(sizes, ds.num_classes)
    )
    return TaskData(
        name=display_name(ref),
        ref=ref,
        label_names=tuple(ds.label_names),
        parts=splits.apply(ds),
        splits=splits,
    )
