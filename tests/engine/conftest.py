"""Fixtures: a tiny base model and three fine-tunes on disk."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny_models import tiny_tensors, write_folder


@pytest.fixture
def models(tmp_path: Path) -> dict[str, object]:
    """A base and three fine-tunes (base + small deltas), fp32."""
    base = tiny_tensors(0)
    out: dict[str, object] = {"base": write_folder(tmp_path / "base", base), "tensors": {}}
    out["tensors"]["base"] = base  # type: ignore[index]
    for i in range(3):
        d = tiny_tensors(100 + i, scale=0.1)
        ft = {n: base[n] + d[n] for n in base}
        out[f"ft{i}"] = write_folder(tmp_path / f"ft{i}", ft, shard_bytes=600)
        out["tensors"][f"ft{i}"] = ft  # type: ignore[index]
    return out
