"""`splice inspect`: what a checkpoint holds, and how two checkpoints differ, tensor by tensor.

Everything streams: one tensor (or one pair) is in memory at a time. For two checkpoints
the per-tensor figures are ‖b − a‖₂, ‖b − a‖₂ / ‖a‖₂ and cos(a, b) over the flattened
tensors, computed in float64.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch

from splice.io import CheckpointReader


@dataclass
class Summary:
    tensors: int
    parameters: int
    bytes: int
    dtypes: dict[str, int]


def summarize(reader: CheckpointReader) -> tuple[Summary, list[tuple[str, tuple[int, ...], str]]]:
    rows = []
    params = size = 0
    dtypes: Counter[str] = Counter()
    for name in reader.names():
        info = reader.info(name)
        dt = str(info.dtype).removeprefix("torch.")
        rows.append((name, info.shape, dt))
        params += info.numel
        size += info.nbytes
        dtypes[dt] += info.numel
    return Summary(len(rows), params, size, dict(dtypes)), rows


@dataclass
class DeltaRow:
    name: str
    shape: tuple[int, ...]
    delta_norm: float
    relative: float
    cosine: float


def compare(
    a: CheckpointReader, b: CheckpointReader
) -> tuple[list[DeltaRow], list[str], list[str]]:
    """Per-tensor deltas for names both share; plus names only in a, only in b."""
    names_b = set(b.names())
    common = [n for n in a.names() if n in names_b]
    only_a = [n for n in a.names() if n not in names_b]
    only_b = sorted(names_b - set(a.names()))
    rows = []
    for name in common:
        ia, ib = a.info(name), b.info(name)
        if ia.shape != ib.shape:
            rows.append(DeltaRow(name, ia.shape, float("nan"), float("nan"), float("nan")))
            continue
        x = a.read(name).double().reshape(-1)
        y = b.read(name).double().reshape(-1)
        d = torch.linalg.vector_norm(y - x).item()
        nx = torch.linalg.vector_norm(x).item()
        ny = torch.linalg.vector_norm(y).item()
        cos = (x @ y).item() / (nx * ny) if nx > 0 and ny > 0 else float("nan")
        rows.append(DeltaRow(name, ia.shape, d, d / nx if nx > 0 else float("nan"), cos))
    return rows, only_a, only_b


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"
