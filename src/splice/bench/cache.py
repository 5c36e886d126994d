"""The bench cache: content-hash keys and atomically written folders.

Trained experts live under ``cache_root()/bench`` (``$SPLICE_CACHE``, default
``~/.cache/splice``), one folder per key. A key is the SHA-256 of a canonical JSON
(sorted keys, no whitespace) of everything that determines the result:

- the model's identity: its config.json's hash and, for each weight file, its name, size
  and SHA-256 (so a different checkpoint under the same path is a different model);
- the task's identity (`TaskData.identity`: data content hash + split indices hash);
- the kind (full / lora) and the training settings that apply to it.

The splice version is deliberately not part of it: a release that does not change these
inputs reuses the experts. A folder is built under a temporary name beside its final
place and renamed into place when complete; a crash leaves no half folder that looks
complete, and two runs racing for one key both end with a complete folder.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from splice.train.models import cache_root

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")
_FILE_HASHES: dict[tuple[str, int, int], str] = {}


def bench_root() -> Path:
    return cache_root() / "bench"


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, remembered per (path, size, mtime) for this process."""
    st = path.stat()
    memo = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if memo not in _FILE_HASHES:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        _FILE_HASHES[memo] = h.hexdigest()
    return _FILE_HASHES[memo]


def model_identity(folder: Path) -> dict[str, Any]:
    """What identifies an HF model folder: config.json's hash and its weight files."""
    weights = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    return {
        "config": file_sha256(folder / "config.json"),
        "weights": [
            {"name": p.name, "size": p.stat().st_size, "sha256": file_sha256(p)} for p in weights
        ],
    }


def content_key(payload: Any) -> str:
    """SHA-256 hex of the canonical JSON of ``payload``."""
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()
