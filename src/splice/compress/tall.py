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
from pathlib import Path

from torch import Tensor

from splice.compress.stream import DEFAULT_SHARD_BYTES, CompressReport, compress
from splice.errors import MergeValidationError
from splice.merge.methods.consensus import tall_masks, task_sum
from splice.numbers import check_numbers

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


def compress_tall(
    base: str,
    models: Sequence[str],
    out_dir: str | Path,
    *,
    lambdas: float | Sequence[float] = DEFAULT_LAMBDA,
    names: Sequence[str] | None = None,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    overwrite: int | bool = False,
    allow_nonfinite: bool = False,
) -> CompressReport:
    """Compress fine-tuned ``models`` of ``base`` into τ_MTL plus per-task TALL masks."""
    lam = [float(lambdas)] * len(models) if isinstance(lambdas, (int, float)) else list(lambdas)
    if len(lam) != len(models):
        raise MergeValidationError(f"{len(lam)} TALL lambdas for {len(models)} models")
    check_numbers(lam, "lambda", ge=0)  # finite and >= 0, before any tensor is read
    return compress(
        base,
        models,
        out_dir,
        TallKernel(lam),
        method="tall",
        params={"lambda": lam},
        names=names,
        shard_bytes=shard_bytes,
        overwrite=overwrite,
        allow_nonfinite=allow_nonfinite,
    )
