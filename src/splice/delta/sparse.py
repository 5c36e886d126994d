"""`Sparse`: ΔW zero except at some entries (TIES / DARE / magnitude-pruned task vectors,
TALL masks). Stored as flat int64 indices (strictly increasing) and their values.

`sparsify(delta, density)` keeps exactly k = round(density · n) entries of largest |ΔW|
(`splice.delta.topk.largest_mask`: ties at the threshold in flat order): the
magnitude trim of TIES without rescaling. Memory: 8 + element size bytes per kept entry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from splice.delta._common import DeltaOps, element_bytes
from splice.delta.base import Delta, DeltaError, check_factor, delta_type
from splice.delta.topk import largest_mask


@delta_type("sparse")
@dataclass(frozen=True)
class Sparse(DeltaOps):
    indices: Tensor
    values: Tensor
    size: tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "size", tuple(int(s) for s in self.size))
        n = 1
        for s in self.size:
            n *= s
        idx = self.indices
        if idx.dtype != torch.int64 or idx.dim() != 1 or self.values.shape != idx.shape:
            raise DeltaError("a sparse delta needs 1-D int64 indices and values of equal length")
        if idx.numel() and (
            int(idx[0]) < 0 or int(idx[-1]) >= n or bool((idx[1:] <= idx[:-1]).any())
        ):
            raise DeltaError(f"sparse delta indices must increase strictly within [0, {n})")

    @classmethod
    def from_mask(cls, dense: Tensor, mask: Tensor) -> Sparse:
        idx = mask.reshape(-1).nonzero().reshape(-1)
        return cls(idx, dense.reshape(-1)[idx].clone(), tuple(dense.shape))

    @property
    def shape(self) -> tuple[int, ...]:
        return self.size

    @property
    def density(self) -> float:
        n = 1
        for s in self.size:
            n *= s
        return self.indices.numel() / n if n else 0.0

    @property
    def nbytes(self) -> int:
        return element_bytes(self.indices) + element_bytes(self.values)

    def to_dense(self, base: Tensor | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
        out = torch.zeros(self.size, dtype=dtype)
        out.view(-1)[self.indices] = self.values.to(dtype)
        return out

    def scale(self, factor: float) -> Sparse:
        return Sparse(self.indices, self.values * check_factor(factor), self.size)

    def _add_same(self, other: Sparse) -> Sparse:
        idx = torch.cat([self.indices, other.indices])
        vals = torch.cat([self.values.float(), other.values.float()])
        uniq, inverse = torch.unique(idx, sorted=True, return_inverse=True)
        summed = torch.zeros(uniq.numel(), dtype=vals.dtype).index_add_(0, inverse, vals)
        return Sparse(uniq, summed, self.size)

    def tensors(self) -> dict[str, Tensor]:
        return {"indices": self.indices, "values": self.values}

    def attributes(self) -> dict[str, Any]:
        return {"size": list(self.size)}


def sparsify(delta: Delta, density: float, base: Tensor | None = None) -> Sparse:
    """Keep the round(density · n) entries of largest magnitude of any delta."""
    if not 0.0 <= density <= 1.0:
        raise DeltaError(f"density must be in [0, 1], got {density}")
    dense = delta.to_dense(base)
    return Sparse.from_mask(dense, largest_mask(dense, density))
