"""TALL-mask compression (Wang et al. 2024, "Localizing Task Information for Improved Model
Merging and Compression", section 5; official code ``nik-dim/tall_masks``).

Store the task-arithmetic vector τ_MTL = Σ_t τ_t once, plus one bit per entry per task:

    m_t = |τ_t| > λ_t · |τ_MTL − τ_t|          (strict, as the official code)
    θ̂_t = base + m_t ⊙ τ_MTL                   (scaling 1.0, as its TALL-mask evaluation)

The official code picks λ_t per task on validation data from {0.2, …, 0.6} and saves the
masks of the whole flattened model with ``np.packbits``; here λ_t is given (default 0.4,
the middle of that grid), and masks are packed per tensor (see `splice.compress.packed`).
The mask is per entry, so tensor-by-tensor streaming is exact.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

from pydantic import Field
from torch import Tensor

from splice.compress.registry import compression_method
from splice.merge.methods.consensus import tall_masks, task_sum
from splice.merge.registry import PerModel

DEFAULT_LAMBDA = 0.4


class TallKernel:
    """Per tensor: (τ_MTL, TALL masks); every restore scale is 1."""

    def __init__(self, lambdas: Sequence[float]) -> None:
        self.lambdas = list(lambdas)

    def __call__(self, base: Tensor, deltas: list[Tensor]) -> tuple[Tensor, list[Tensor], tuple]:
        total = task_sum(deltas)
        return total, tall_masks(deltas, total, self.lambdas), ()

    def scales(self, shares: list[Sequence[float]]) -> list[float]:
        return [1.0] * len(self.lambdas)


@compression_method("tall")
def tall(
    *,
    lambda_: PerModel[
        Annotated[float, Field(ge=0, description="TALL mask lambda: one value, or one per model")]
    ] = DEFAULT_LAMBDA,
) -> TallKernel:
    """TALL masks over the task-arithmetic vector."""
    return TallKernel(lambda_)
