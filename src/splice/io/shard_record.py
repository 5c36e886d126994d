"""What `--resume` trusts: a record of each finished shard, and its re-check.

When a shard is finished, the writer stores `<shard>.json` in the partial folder's state
folder: the digest of the shard's header and of each tensor's bytes (hashed from the bytes
as they are written, so no extra read), and the digests of the inputs each tensor was made
from, as the caller gave them (the merge engine hashes each input tensor as it reads it, see
`input_digest`).

The digest is XXH3-128 (`content_hasher`; the record names it under ``"hash"``): these
digests detect changed bytes, made by accident or by a later run, not an adversary's
forged collision (whoever can write the inputs decides the output anyway). It hashes at
~20 GB/s a core against SHA-256's 1.6 here; with SHA-256 a merge spent ~2 s of CPU per
3 GB of inputs on it (0.37B × 4 bf16 checkpoints, about a sixth of the merge's CPU time).

On resume a finished shard is kept only when its record exists and names this digest, the
file has the planned size and header, and re-hashing the file gives the recorded digests.
Cost: one read of the finished shards, small next to merging them again. Checking the
inputs is the caller's part (`ShardedWriter.drop_shards`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import xxhash

from splice.io.output_folder import remove
from splice.io.shard_plan import ShardPlan

_CHUNK = 1 << 24
HASH = "xxh3-128"  # the content digest of records (module docstring)


def raw_bytes(t: torch.Tensor) -> memoryview:
    """A tensor's bytes as stored (row-major, native little-endian), without a copy when
    the tensor is contiguous on the CPU."""
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def content_hasher(prefix: bytes = b"") -> Any:
    """A running `HASH` digest (``update(bytes)``, ``hexdigest()``), fed ``prefix`` first."""
    return xxhash.xxh3_128(prefix)


def digest(data: bytes | memoryview) -> str:
    """The `HASH` digest (hex) of ``data``."""
    return xxhash.xxh3_128_hexdigest(data)


def input_hasher(dtype: torch.dtype, shape: tuple[int, ...] | list[int]) -> Any:
    """A running digest of an input tensor's dtype and shape, to update with its bytes in
    order (a tensor read in row chunks hashes to its `input_digest`)."""
    return content_hasher(f"{dtype}{list(shape)}".encode())


def input_digest(t: torch.Tensor) -> str:
    """Digest of an input tensor as read: dtype, shape and bytes."""
    h = input_hasher(t.dtype, tuple(t.shape))
    h.update(raw_bytes(t))
    return h.hexdigest()


@dataclass
class ShardRecord:
    """`HASH` digests of one finished shard: header, each tensor, and the inputs behind
    them."""

    header: str
    tensors: dict[str, str] = field(default_factory=dict)
    inputs: dict[str, str] = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        data = {
            "hash": HASH,
            "header": self.header,
            "tensors": self.tensors,
            "inputs": self.inputs,
        }
        return (json.dumps(data, sort_keys=True) + "\n").encode()

    @classmethod
    def load(cls, path: Path) -> ShardRecord | None:
        """The record at `path`, or None when missing, unreadable or of another digest (an
        older splice's SHA-256 records)."""
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if data.get("hash") != HASH:
                return None
            rec = cls(str(data["header"]), dict(data["tensors"]), dict(data["inputs"]))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None
        ok = all(isinstance(v, str) for v in [*rec.tensors.values(), *rec.inputs.values()])
        return rec if ok else None


def resume_record(
    path: Path, rec_path: Path, header: bytes, size: int, regions: list[tuple[str, int, int]]
) -> tuple[ShardRecord | None, str | None]:
    """(record, None) to keep the finished shard at `path`; (None, why) after removing it and
    its record; (None, None) when there is no such shard. `size` is the planned file size,
    `regions` the (tensor name, begin, end) ranges in the file."""
    if not (path.exists() or path.is_symlink()):
        remove_quietly(rec_path)
        return None, None
    record = ShardRecord.load(rec_path)
    if path.is_symlink() or not path.is_file():
        reason: str | None = "it is not a regular file"
    elif record is None:
        reason = "it has no record (finished by an older splice, or damaged)"
    else:
        reason = check_shard_file(path, header, size, regions, record)
    if reason is None:
        return record, None
    remove(path)
    remove_quietly(rec_path)
    return None, reason


def notice_redone(redo: list[tuple[str, str]]) -> None:
    """One line on stderr for the finished shards a resumed run redoes."""
    if redo:
        name, why = redo[0]
        more = f" (and {len(redo) - 1} more)" if len(redo) > 1 else ""
        print(
            f"splice: note: --resume redoes {len(redo)} finished shard(s): {name}: {why}{more}",
            file=sys.stderr,
        )


def check_shard_file(
    path: Path, header: bytes, size: int, regions: list[tuple[str, int, int]], record: ShardRecord
) -> str | None:
    """Why the finished shard at `path` does not match `record` (None when it does)."""
    try:
        if path.stat().st_size != size:
            return "its size differs from the plan"
        with open(path, "rb") as f:
            if f.read(len(header)) != header:
                return "its header differs from the plan"
            if digest(header) != record.header:
                return "its header differs from the record"
            for name, begin, end in regions:
                h = content_hasher()
                f.seek(begin)
                left = end - begin
                while left:
                    block = f.read(min(_CHUNK, left))
                    if not block:
                        return "it is shorter than planned"
                    h.update(block)
                    left -= len(block)
                if record.tensors.get(name) != h.hexdigest():
                    return f"tensor '{name}' changed since the shard was finished"
    except OSError as e:
        return f"it cannot be read ({e.strerror})"
    return None


def record_path(state_dir: Path, shard: str) -> Path:
    return state_dir / (shard + ".json")


def remove_quietly(*paths: Path) -> None:
    for p in paths:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(p)


def layout_digest(fingerprint: str, shards: list[ShardPlan], metadata: dict[str, str]) -> str:
    """Identity of a run for --resume: the caller's fingerprint, the shard layout, metadata."""
    layout = [
        [p.filename, [[t.name, str(t.dtype), list(t.shape)] for t in p.tensors], p.offsets]
        for p in shards
    ]
    blob = json.dumps([fingerprint, layout, metadata], sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()
