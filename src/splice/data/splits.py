"""Fixed, seeded, stratified train / validation / test splits, saved as small JSON files.

Algorithm (`make_splits`), for a dataset of N examples and fractions (f_train, f_val,
f_test) summing to 1:
1. Every example i gets the key ``sha256(f"{seed}:{i}")`` (first 8 bytes, big-endian); the
   order by key is a seeded shuffle that depends on nothing else (not on numpy or Python
   versions, nor on the other examples).
2. Within each class c (n_c examples, in key order) the first
   ``n_test = floor(n_c·f_test + 1/2)`` go to test, the next
   ``n_val = min(floor(n_c·f_val + 1/2), n_c − n_test)`` to validation, the rest to train.
   So every split has each class in proportion (up to rounding), and the test part of a
   class depends only on the seed and f_test.
3. Optional caps, ``max_per_class={"train": 64}``: a split keeps only the first k of each
   class (in key order). A capped split is a subset of the uncapped one, and capping train
   leaves validation and test unchanged.
4. Each split lists its indices in key order (a seeded shuffle across classes, so reading a
   split in order does not walk one class after another).

The saved file holds the indices, the parameters, per-class counts and the dataset's
content hash (`TextClassificationDataset.content_hash`); loading it for a dataset checks the
hash, so a split is never silently applied to different data (a changed source, a
different loader option).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from splice.data.dataset import TextClassificationDataset
from splice.errors import DataError
from splice.io.out_location import existing_ancestor
from splice.io.output_folder import write_file_atomically

SPLIT_NAMES = ("train", "validation", "test")
FORMAT = "splice-splits/1"
_KEYS = {
    "format",
    "source",
    "n_examples",
    "data_hash",
    "label_names",
    "seed",
    "sizes",
    "max_per_class",
    "counts",
    "splits",
}


@dataclass(frozen=True)
class Splits:
    """Index lists of the three splits of one dataset, and how they were made (the fields in
    the saved file's order)."""

    source: str
    n_examples: int
    data_hash: str
    label_names: tuple[str, ...]
    seed: int
    sizes: dict[str, float]
    train: tuple[int, ...]
    validation: tuple[int, ...]
    test: tuple[int, ...]
    max_per_class: dict[str, int] = field(default_factory=dict)

    def indices(self, name: str) -> tuple[int, ...]:
        if name not in SPLIT_NAMES:
            raise DataError(f"unknown split {name!r}; splits are {list(SPLIT_NAMES)}")
        return getattr(self, name)

    def check(self, dataset: TextClassificationDataset) -> None:
        """Raise `DataError` unless ``dataset`` is exactly the data the split was made for."""
        h = dataset.content_hash()
        if h != self.data_hash:
            raise DataError(
                f"split does not match the data: it was made for {self.source!r} with "
                f"{self.n_examples} examples (hash {self.data_hash[:12]}), this data "
                f"({dataset.source!r}, {len(dataset)} examples) hashes to {h[:12]}; the "
                "source or a loader option changed: make a new split"
            )

    def apply(self, dataset: TextClassificationDataset) -> dict[str, TextClassificationDataset]:
        """``{"train": ..., "validation": ..., "test": ...}`` after checking the hash."""
        self.check(dataset)
        return {n: dataset.subset(self.indices(n), f"{dataset.source}:{n}") for n in SPLIT_NAMES}

    def to_json(self, dataset: TextClassificationDataset | None = None) -> dict[str, Any]:
        counts: dict[str, dict[str, int]] = {}
        if dataset is not None:
            for n in SPLIT_NAMES:
                c = [0] * len(self.label_names)
                for i in self.indices(n):
                    c[dataset.labels[i]] += 1
                counts[n] = dict(zip(self.label_names, c))
        return {
            "format": FORMAT,
            "source": self.source,
            "n_examples": self.n_examples,
            "data_hash": self.data_hash,
            "label_names": list(self.label_names),
            "seed": self.seed,
            "sizes": dict(self.sizes),
            "max_per_class": dict(self.max_per_class),
            "counts": counts,
            "splits": {n: list(self.indices(n)) for n in SPLIT_NAMES},
        }

    def save(self, path: str | Path, dataset: TextClassificationDataset | None = None) -> Path:
        """Write the JSON file atomically (a temporary file renamed into place). A folder or an
        unwritable place is a DataError, before anything is written."""
        path = Path(path)
        if path.is_dir():
            raise DataError(f"{path} is a folder; give a file name for the split (split.json)")
        above = existing_ancestor(path)
        if not above.is_dir():
            raise DataError(f"cannot write the split file {path}: {above} is a file, not a folder")
        text = json.dumps(self.to_json(dataset), separators=(",", ":")) + "\n"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_file_atomically(path, text.encode("utf-8"))
        except OSError as e:
            raise DataError(f"cannot write the split file {path}: {e.strerror or e}") from e
        return path


def _fractions(sizes: Sequence[float] | Mapping[str, float]) -> dict[str, float]:
    if isinstance(sizes, Mapping):
        unknown = set(sizes) - set(SPLIT_NAMES)
        if unknown:
            raise DataError(f"unknown split(s) {sorted(unknown)}; splits are {list(SPLIT_NAMES)}")
        fr = {n: float(sizes.get(n, 0.0)) for n in SPLIT_NAMES}
    else:
        if len(sizes) != 3:
            raise DataError(f"sizes must be 3 fractions (train, validation, test), got {sizes}")
        fr = dict(zip(SPLIT_NAMES, (float(x) for x in sizes)))
    if any(not 0.0 <= v <= 1.0 for v in fr.values()):
        raise DataError(f"split fractions must be in [0, 1], got {fr}")
    if not math.isclose(sum(fr.values()), 1.0, abs_tol=1e-6):
        raise DataError(f"split fractions must sum to 1, got {fr} (sum {sum(fr.values()):g})")
    return fr


def _caps(max_per_class: Mapping[str, int | None] | None) -> dict[str, int]:
    caps: dict[str, int] = {}
    for name, cap in (max_per_class or {}).items():
        if name not in SPLIT_NAMES:
            raise DataError(
                f"max_per_class: unknown split {name!r}; splits are {list(SPLIT_NAMES)}"
            )
        if cap is None:
            continue
        if isinstance(cap, bool) or not isinstance(cap, int) or cap < 1:
            raise DataError(f"max_per_class[{name!r}] must be a positive integer, got {cap!r}")
        caps[name] = cap
    return caps


def order_key(seed: int, index: int) -> int:
    """The shuffle key of example ``index`` under ``seed`` (first 8 bytes of a SHA-256)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{index}".encode()).digest()[:8], "big")


def _round_half_up(x: float) -> int:
    return math.floor(x + 0.5)


def class_split_sizes(n_c: int, fractions: Mapping[str, float]) -> dict[str, int]:
    """How many of a class's ``n_c`` examples each split gets (step 2 of the algorithm)."""
    n_test = _round_half_up(n_c * fractions["test"])
    n_val = min(_round_half_up(n_c * fractions["validation"]), n_c - n_test)
    return {"train": n_c - n_test - n_val, "validation": n_val, "test": n_test}


def min_class_size(sizes: Sequence[float] | Mapping[str, float] = (0.8, 0.1, 0.1)) -> int:
    """The fewest examples a class needs to appear in every split with a nonzero fraction
    (5 for 80/10/10)."""
    fr = _fractions(sizes)
    wanted = [n for n in SPLIT_NAMES if fr[n] > 0]
    n_c = 1
    while any(class_split_sizes(n_c, fr)[n] == 0 for n in wanted):
        n_c += 1
    return n_c


def make_splits(
    dataset: TextClassificationDataset,
    seed: int = 0,
    sizes: Sequence[float] | Mapping[str, float] = (0.8, 0.1, 0.1),
    *,
    max_per_class: Mapping[str, int | None] | None = None,
) -> Splits:
    """Stratified seeded splits of ``dataset`` (see the module docstring)."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise DataError(f"seed must be an integer, got {seed!r}")
    fr = _fractions(sizes)
    caps = _caps(max_per_class)
    keys = {i: order_key(seed, i) for i in range(len(dataset))}
    by_class: dict[int, list[int]] = {}
    for i in sorted(keys, key=keys.__getitem__):
        by_class.setdefault(dataset.labels[i], []).append(i)
    parts: dict[str, list[int]] = {n: [] for n in SPLIT_NAMES}
    for members in by_class.values():
        n = class_split_sizes(len(members), fr)
        n_test, n_val = n["test"], n["validation"]
        chunk = {
            "test": members[:n_test],
            "validation": members[n_test : n_test + n_val],
            "train": members[n_test + n_val :],
        }
        for name, idx in chunk.items():
            parts[name].extend(idx[: caps[name]] if name in caps else idx)
    ordered = {n: tuple(sorted(parts[n], key=keys.__getitem__)) for n in SPLIT_NAMES}
    return Splits(
        train=ordered["train"],
        validation=ordered["validation"],
        test=ordered["test"],
        seed=seed,
        sizes=fr,
        data_hash=dataset.content_hash(),
        n_examples=len(dataset),
        label_names=dataset.label_names,
        source=dataset.source,
        max_per_class=caps,
    )


def load_splits(path: str | Path, dataset: TextClassificationDataset | None = None) -> Splits:
    """Read a saved split; with ``dataset``, also check it was made for exactly that data."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: no such split file") from None
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: not a readable split file ({e})") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise DataError(f"{path}: not a splice split file (format {FORMAT!r} expected)")
    unknown = set(obj) - _KEYS
    if unknown:
        raise DataError(f"{path}: unknown key(s) {sorted(unknown)}")
    try:
        n = int(obj["n_examples"])
        splits = {name: tuple(int(i) for i in obj["splits"][name]) for name in SPLIT_NAMES}
        result = Splits(
            **splits,
            seed=int(obj["seed"]),
            sizes={k: float(v) for k, v in obj["sizes"].items()},
            data_hash=str(obj["data_hash"]),
            n_examples=n,
            label_names=tuple(obj["label_names"]),
            source=str(obj["source"]),
            max_per_class={k: int(v) for k, v in obj.get("max_per_class", {}).items()},
        )
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise DataError(f"{path}: malformed split file ({type(e).__name__}: {e})") from None
    seen: set[int] = set()
    for name in SPLIT_NAMES:
        for i in splits[name]:
            if not 0 <= i < n:
                raise DataError(f"{path}: {name} index {i} outside 0..{n - 1}")
            if i in seen:
                raise DataError(f"{path}: index {i} is in more than one split")
            seen.add(i)
    if dataset is not None:
        result.check(dataset)
    return result
