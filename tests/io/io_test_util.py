"""Helpers for the io tests: hand-made safetensors files, good and broken."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import torch

from splice.io.dtypes import safetensors_name

DTYPES = [
    torch.float64,
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
]


def sample(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Deterministic random values of any supported dtype."""
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    if dtype.is_floating_point:
        return torch.randn(shape, generator=g).to(dtype)
    info = torch.iinfo(dtype)
    lo, hi = max(info.min, -1000), min(info.max, 1000)
    return torch.randint(lo, hi + 1, shape, generator=g, dtype=torch.int64).to(dtype)


def raw_bytes(t: torch.Tensor) -> bytes:
    """The little-endian bytes of a tensor."""
    if t.numel() == 0:
        return b""
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def write_raw(
    path: Path, header: dict[str, Any] | bytes, data: bytes = b"", header_size: int | None = None
) -> Path:
    """Write a safetensors-shaped file from a header (dict or raw bytes) and a data blob."""
    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    size = len(body) if header_size is None else header_size
    path.write_bytes(struct.pack("<Q", size) + body + data)
    return path


def write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    """A valid safetensors file written by hand (file order = dict order)."""
    header: dict[str, Any] = {}
    data = b""
    for name, t in tensors.items():
        b = raw_bytes(t)
        header[name] = {
            "dtype": safetensors_name(t.dtype),
            "shape": list(t.shape),
            "data_offsets": [len(data), len(data) + len(b)],
        }
        data += b
    return write_raw(path, header, data)


def bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (NaN-safe, -0.0-safe)."""
    return a.dtype == b.dtype and a.shape == b.shape and raw_bytes(a) == raw_bytes(b)
