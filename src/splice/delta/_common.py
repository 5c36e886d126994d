"""What every delta type shares: `add` with the most specific exact result, `apply`, and the
default (de)serialization by field name. Kept apart from the protocol in `base.py`."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from splice.delta.base import Delta, check_shape


class DeltaOps:
    """Mixin for delta dataclasses. A type may define ``_add_same(other)`` (same type,
    same shape) returning an exact result, or None to fall back to a dense sum."""

    def add(self, other: Delta, base: Tensor | None = None) -> Delta:
        """ΔW_self + ΔW_other, kept in the most specific exact representation."""
        from splice.delta.dense import Dense

        me: Any = self
        check_shape(me.shape, other)
        if type(other) is type(self):
            same = me._add_same(other)
            if same is not None:
                return same
        return Dense(me.to_dense(base) + other.to_dense(base))

    @classmethod
    def from_parts(cls, tensors: dict[str, Tensor], attrs: dict[str, Any]) -> Delta:
        return cls(**tensors, **attrs)  # type: ignore[return-value]

    def _add_same(self, other: Any) -> Delta | None:
        return None


def element_bytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def float_dtype(t: Tensor) -> torch.dtype:
    """float64 stays float64, everything else computes in float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32
