"""The labeled-text record every loader returns, its content hash, and shared helpers.

A `TextClassificationDataset` is an immutable list of (text, label) pairs with integer labels
``0 .. len(label_names) - 1``, the human names of those labels, and the name of its source.
``info`` carries provenance (the files read, rows dropped and why) for `splice data show`.

The content hash (`content_hash`) identifies the data itself, not where it came from: it
is SHA-256 over the label names and every (label, text) pair in order, each field
length-prefixed so that no two different datasets can serialize to the same bytes. A saved
split stores it, so a split is only ever applied to the exact data it was made for.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from splice.errors import DataError

CACHE_ENV = "SPLICE_DATA"
# The most classes a dataset may have: a bound on what a label column can make splice
# allocate (names, a classification head), far above any real task.
MAX_CLASSES = 10_000


class SourceMissingError(DataError):
    """A built-in dataset's source (pip, npm or apt package) is not installed."""


@dataclass(frozen=True)
class TextClassificationDataset:
    """Texts with integer labels ``0 .. K-1``, the K label names, and the source name."""

    texts: tuple[str, ...]
    labels: tuple[int, ...]
    label_names: tuple[str, ...]
    source: str
    info: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "texts", tuple(self.texts))
        object.__setattr__(self, "labels", tuple(int(x) for x in self.labels))
        object.__setattr__(self, "label_names", tuple(self.label_names))
        if len(self.texts) != len(self.labels):
            raise DataError(f"{self.source}: {len(self.texts)} texts but {len(self.labels)} labels")
        if len(set(self.label_names)) != len(self.label_names):
            raise DataError(f"{self.source}: duplicate label names {list(self.label_names)}")
        k = len(self.label_names)
        if k > MAX_CLASSES:
            raise DataError(f"{self.source}: {k:,} classes; at most {MAX_CLASSES:,} are supported")
        bad = next((y for y in self.labels if not 0 <= y < k), None)
        if bad is not None:
            raise DataError(f"{self.source}: label {bad} outside 0..{k - 1}")

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    def class_counts(self) -> dict[str, int]:
        """Examples per class, in label order (classes without examples count 0)."""
        c = Counter(self.labels)
        return {name: c.get(i, 0) for i, name in enumerate(self.label_names)}

    def subset(
        self, indices: Sequence[int], source: str | None = None
    ) -> TextClassificationDataset:
        """The examples at ``indices`` (in that order), with the same label names."""
        n = len(self.texts)
        for i in indices:
            if not 0 <= i < n:
                raise DataError(f"{self.source}: index {i} outside 0..{n - 1}")
        return TextClassificationDataset(
            texts=tuple(self.texts[i] for i in indices),
            labels=tuple(self.labels[i] for i in indices),
            label_names=self.label_names,
            source=source or self.source,
            info=dict(self.info),
        )

    def content_hash(self) -> str:
        """SHA-256 (hex) of the label names and every (label, text) pair, in order."""
        h = hashlib.sha256()

        def put(b: bytes) -> None:
            h.update(len(b).to_bytes(8, "little"))
            h.update(b)

        put(b"splice-text-classification/1")
        put(str(len(self.label_names)).encode())
        for name in self.label_names:
            put(name.encode("utf-8", "surrogatepass"))
        put(str(len(self.texts)).encode())
        for text, label in zip(self.texts, self.labels):
            put(str(label).encode())
            put(text.encode("utf-8", "surrogatepass"))
        return h.hexdigest()


def from_pairs(
    pairs: Iterable[tuple[str, int]],
    label_names: Sequence[str],
    source: str,
    *,
    dedupe: bool = True,
    info: dict[str, Any] | None = None,
) -> TextClassificationDataset:
    """Build a dataset from (text, label) pairs, optionally removing duplicate texts.

    Deduplication (on the exact text after loading): the first occurrence of a text is kept,
    later copies with the same label are dropped, and a text seen with two different labels
    is dropped entirely (it cannot be labeled consistently). Duplicates would otherwise land
    on both sides of a train/test split and inflate test accuracy. The counts dropped are
    recorded in ``info``.
    """
    info = dict(info or {})
    pairs = list(pairs)
    if dedupe:
        seen: dict[str, int] = {}
        conflicting: set[str] = set()
        for text, label in pairs:
            if text in seen and seen[text] != label:
                conflicting.add(text)
            seen.setdefault(text, label)
        kept: list[tuple[str, int]] = []
        emitted: set[str] = set()
        for text, label in pairs:
            if text in conflicting or text in emitted:
                continue
            emitted.add(text)
            kept.append((text, label))
        n_conflicting = sum(1 for t, _ in pairs if t in conflicting)
        info["duplicates_dropped"] = len(pairs) - len(kept) - n_conflicting
        info["conflicting_dropped"] = n_conflicting
        pairs = kept
    return TextClassificationDataset(
        texts=tuple(t for t, _ in pairs),
        labels=tuple(y for _, y in pairs),
        label_names=tuple(label_names),
        source=source,
        info=info,
    )


def default_cache_dir() -> Path:
    """Where downloaded sources live: ``$SPLICE_DATA``, else ``~/.cache/splice/data``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "splice" / "data"


def package_dir(package: str) -> Path | None:
    """The folder of an installed (top-level) Python package, without importing it."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def installed_source(base: Path | None, parts: tuple[str, ...], missing: str, install: str) -> Path:
    """``base / parts`` when it exists, else `SourceMissingError`: ``missing``, where it looked,
    and the ``install`` command."""
    path = base.joinpath(*parts) if base is not None else None
    if path is None or not path.exists():
        where = f" (looked for {path})" if path is not None else ""
        raise SourceMissingError(f"{missing}{where}; install it with: {install}")
    return path
