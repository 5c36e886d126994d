"""An adapter library for retrieval: adapter folders, each with a stored centroid.

A centroid is the mean of the (unit) embeddings of some of the adapter's training inputs
(LoraRetriever: the mean embedding of m samples of the LoRA's training data),

    c = (1/m) Σ_j e(x_j),

stored beside the adapter as ``splice_centroid.safetensors``: one float32 tensor
``centroid`` (dim,), and string metadata ``embedder`` (the embedder's id,
`splice.compose.embedding`), ``examples`` (m) and ``format`` (``splice-centroid/1``).
No pickle; written atomically (a temporary file in the same folder renamed over the old one).

`AdapterLibrary.load(dirs)` reads every adapter's centroid and checks, before any model is
touched, that there is at least one adapter, every adapter has a centroid, names are unique,
and all centroids come from one embedder with one dimension (a clear one-line
`RetrievalError` otherwise).
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load, save
from torch import Tensor

from splice.errors import SpliceError
from splice.io.output_folder import write_file_atomically
from splice.io.safe_paths import member, read_limited

CENTROID_FILE = "splice_centroid.safetensors"
CENTROID_FORMAT = "splice-centroid/1"
_MAX_BYTES = 64 << 20


class RetrievalError(SpliceError):
    pass


@dataclass(frozen=True)
class Centroid:
    vector: Tensor  # (dim,) float32
    embedder: str
    examples: int

    @property
    def dim(self) -> int:
        return int(self.vector.shape[0])


def compute_centroid(embeddings: Tensor) -> Tensor:
    """The mean of the rows of ``embeddings`` (n, dim), float32."""
    if embeddings.dim() != 2 or embeddings.shape[0] == 0:
        raise RetrievalError("a centroid needs at least one embedding (an (n, dim) tensor)")
    return embeddings.float().mean(dim=0)


def centroid_path(adapter_dir: str | os.PathLike[str]) -> Path:
    return Path(adapter_dir) / CENTROID_FILE


def write_centroid(
    path: str | os.PathLike[str], vector: Tensor, embedder: str, examples: int
) -> Path:
    """Write a centroid file at ``path`` (a folder: its ``splice_centroid.safetensors``)."""
    target = Path(path)
    if target.is_dir():
        target = target / CENTROID_FILE
    v = vector.detach().float().cpu().contiguous()
    if v.dim() != 1 or not bool(torch.isfinite(v).all()):
        raise RetrievalError(f"{target}: a centroid must be a finite 1-D vector")
    metadata = {"embedder": embedder, "examples": str(int(examples)), "format": CENTROID_FORMAT}
    data = save({"centroid": v}, metadata=metadata)
    write_file_atomically(target, data)
    return target


def read_centroid(path: str | os.PathLike[str]) -> Centroid:
    """A centroid file, or the one beside an adapter folder; RetrievalError if missing or
    malformed."""
    p = Path(path)
    if p.is_dir():
        found = member(p, CENTROID_FILE, error=RetrievalError)
        if found is None:
            raise RetrievalError(
                f"adapter {p} has no {CENTROID_FILE}; compute one with "
                "`splice retrieve centroid` (from some of its training inputs)"
            )
        p = found
    elif not p.exists():
        raise RetrievalError(f"{p}: no such centroid file")
    raw = read_limited(p, _MAX_BYTES, "centroid file", RetrievalError)
    try:
        tensors = load(raw)
        metadata = _metadata(raw)
    except Exception as e:  # safetensors raises its own SafetensorError
        raise RetrievalError(f"{p}: not a safetensors file ({e})") from None
    vector = tensors.get("centroid")
    if metadata.get("format") != CENTROID_FORMAT or vector is None or vector.dim() != 1:
        raise RetrievalError(f"{p}: not a splice centroid file ({CENTROID_FORMAT})")
    examples = metadata.get("examples", "0")
    if not examples.isdigit() or "embedder" not in metadata:
        raise RetrievalError(f"{p}: centroid metadata lacks 'embedder' or 'examples'")
    vector = vector.float()
    if not bool(torch.isfinite(vector).all()):
        raise RetrievalError(f"{p}: the centroid holds NaN or inf")
    return Centroid(vector, metadata["embedder"], int(examples))


def _metadata(raw: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file's header (8-byte length, then JSON)."""
    (size,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + size])
    meta = header.get("__metadata__") or {}
    return {str(k): str(v) for k, v in meta.items()}


@dataclass
class LibraryEntry:
    name: str
    path: Path
    centroid: Centroid


@dataclass
class AdapterLibrary:
    """Adapters with their centroids, all from one embedder (module docstring)."""

    entries: list[LibraryEntry]

    @classmethod
    def load(
        cls,
        adapter_dirs: Sequence[str | os.PathLike[str]],
        names: Sequence[str] | None = None,
    ) -> AdapterLibrary:
        """``names`` default to the folders' names."""
        if not adapter_dirs:
            raise RetrievalError("the adapter library is empty: give at least one adapter")
        paths = [Path(d) for d in adapter_dirs]
        names = list(names) if names is not None else [p.name for p in paths]
        if len(names) != len(paths):
            raise RetrievalError(f"{len(names)} name(s) for {len(paths)} adapter(s)")
        seen: dict[str, Path] = {}
        for name, path in zip(names, paths, strict=True):
            if name in seen:
                raise RetrievalError(
                    f"two adapters are named '{name}' ({seen[name]} and {path}); name them "
                    "NAME=PATH"
                )
            seen[name] = path
        entries = [LibraryEntry(n, p, read_centroid(p)) for n, p in zip(names, paths, strict=True)]
        first = entries[0]
        for e in entries[1:]:
            if e.centroid.embedder != first.centroid.embedder:
                raise RetrievalError(
                    f"adapter '{e.name}' has a centroid from embedder '{e.centroid.embedder}', "
                    f"'{first.name}' from '{first.centroid.embedder}'; recompute them with one "
                    "embedder"
                )
            if e.centroid.dim != first.centroid.dim:
                raise RetrievalError(
                    f"adapter '{e.name}' has a centroid of dimension {e.centroid.dim}, "
                    f"'{first.name}' of {first.centroid.dim}"
                )
        return cls(entries)

    @property
    def names(self) -> list[str]:
        return [e.name for e in self.entries]

    @property
    def embedder(self) -> str:
        return self.entries[0].centroid.embedder

    @property
    def dim(self) -> int:
        return self.entries[0].centroid.dim

    def matrix(self) -> Tensor:
        """The centroids as rows, (adapters, dim)."""
        return torch.stack([e.centroid.vector for e in self.entries])

    def check_embedder(self, embedder_id: str, dim: int) -> None:
        """RetrievalError unless queries from ``embedder_id`` (of width ``dim``) fit."""
        if embedder_id != self.embedder or dim != self.dim:
            raise RetrievalError(
                f"the library's centroids come from embedder '{self.embedder}' (dimension "
                f"{self.dim}); the queries from '{embedder_id}' (dimension {dim}); use the "
                "same embedder or recompute the centroids"
            )
