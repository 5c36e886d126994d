"""`Ternary`: ΔW = γ · T with T in {−1, 0, +1} and one scale γ per tensor.

ComPEFT (Yadav et al. 2023) keeps the top-k magnitudes' signs and γ = α · σ(ΔW);
BitDelta (Liu et al. 2024) keeps every sign (no zeros) and γ = mean |ΔW|. `ternarize`
builds either from any delta: density 1 with ``scale="mean_abs"`` is BitDelta's
initialization, density < 1 with ``scale="std"`` is ComPEFT's (torch's Bessel-corrected
std of the original update, the paper's α · σ(τ)); ``scale="std_kept"`` takes the std of
the sparsified update (dropped entries zeroed), as the official `replace_noise_and_constant`
does. A one-entry update has no std: γ = |ΔW| then, so it is kept exactly.

Stored as int8 signs (one byte an entry; `nbytes` counts that, a 2-bit packing is a
storage format's business) and a float scale.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from splice.delta._common import DeltaOps, element_bytes
from splice.delta.base import Delta, DeltaError, check_factor, delta_type
from splice.delta.topk import largest_mask

ScaleRule = Literal["std", "std_kept", "mean_abs"]


@delta_type("ternary")
@dataclass(frozen=True)
class Ternary(DeltaOps):
    signs: Tensor
    gamma: float

    def __post_init__(self) -> None:
        if self.signs.dtype != torch.int8:
            raise DeltaError("ternary signs must be int8")
        if self.signs.numel() and int(self.signs.abs().max()) > 1:
            raise DeltaError("ternary signs must be -1, 0 or +1")
        check_factor(self.gamma)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.signs.shape)

    @property
    def nbytes(self) -> int:
        return element_bytes(self.signs) + 4

    def to_dense(self, base: Tensor | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
        return self.signs.to(dtype) * self.gamma

    def scale(self, factor: float) -> Ternary:
        return Ternary(self.signs, self.gamma * check_factor(factor))

    def tensors(self) -> dict[str, Tensor]:
        return {"signs": self.signs}

    def attributes(self) -> dict[str, Any]:
        return {"gamma": self.gamma}


def ternarize(
    delta: Delta,
    density: float = 1.0,
    scale: ScaleRule = "mean_abs",
    alpha: float = 1.0,
    base: Tensor | None = None,
) -> Ternary:
    """Signs of the top round(density · n) magnitudes times α · (std or mean |ΔW|)."""
    if not 0.0 <= density <= 1.0:
        raise DeltaError(f"density must be in [0, 1], got {density}")
    check_factor(alpha)
    dense = delta.to_dense(base)
    mask = largest_mask(dense, density)
    signs = (torch.sign(dense) * mask).to(torch.int8)
    if scale in ("std", "std_kept"):
        src = dense if scale == "std" else dense * mask
        gamma = float(src.std()) if src.numel() > 1 else float(src.abs().sum())
    elif scale == "mean_abs":
        gamma = float(dense.abs().mean()) if dense.numel() else 0.0
    else:
        raise DeltaError(f"unknown ternary scale rule '{scale}' (std, std_kept, mean_abs)")
    return Ternary(signs, alpha * gamma)
