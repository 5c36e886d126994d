"""`Dense`: ΔW stored as a full tensor (a task vector W_ft − W_base)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from splice.delta._common import DeltaOps, element_bytes
from splice.delta.base import DeltaError, check_factor, delta_type


@delta_type("dense")
@dataclass(frozen=True)
class Dense(DeltaOps):
    values: Tensor

    def __post_init__(self) -> None:
        if not isinstance(self.values, Tensor):
            raise DeltaError("a dense delta holds a tensor")

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.values.shape)

    @property
    def nbytes(self) -> int:
        return element_bytes(self.values)

    def to_dense(self, base: Tensor | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
        return self.values.to(dtype)

    def scale(self, factor: float) -> Dense:
        return Dense(self.values * check_factor(factor))

    def _add_same(self, other: Dense) -> Dense:
        return Dense(self.values.float() + other.values.float())

    def tensors(self) -> dict[str, Tensor]:
        return {"values": self.values}

    def attributes(self) -> dict[str, Any]:
        return {}
