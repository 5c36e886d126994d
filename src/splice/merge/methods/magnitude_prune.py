"""Magnitude pruning of task vectors, then task arithmetic (TIES without sign election).

    δ̂_i = trim(δ_i, density_i)              keep the largest-|δ_i| entries of θ_i − base
    merged = base + λ · Σ_i w_i δ̂_i          [/ Σ_i w_i when normalize, |Σ w| >= 1e-8]

Choices: ``scope="model"`` is the default, the same trim as `ties` (exactly
round(density_i · N) entries over the whole model); ``scope="tensor"`` trims each tensor
to round(density_i · n) entries (mergekit dialect: max(1, int(density_i · n))). Ties at
the threshold: first in flat order (mergekit dialect: torch's sort order, as `ties`).
``rescale: true`` restores each δ_i's L1 norm after the trim. mergekit has no method of
this name; ``density`` is required.
"""

from collections.abc import Sequence

from torch import Tensor

from splice.merge.methods._common import (
    TrimScope,
    UnitFloat,
    deltas_,
    linear_combine_,
    magnitude_trim_,
    trim_requests,
)
from splice.merge.registry import MergeContext, PerModel, merge_method


@merge_method("magnitude_prune", needs_base=True, model_stats=trim_requests)
def magnitude_prune(
    base: Tensor,
    tensors: Sequence[Tensor],
    *,
    weight: PerModel[float] = 1.0,
    density: PerModel[UnitFloat],
    lambda_: float = 1.0,
    normalize: bool = False,
    rescale: bool = False,
    scope: TrimScope = "model",
    ctx: MergeContext,
) -> Tensor:
    """Keep the largest entries of each task vector, then add their weighted sum."""
    deltas = deltas_(base, tensors)
    for i, (d, dens) in enumerate(zip(deltas, density, strict=True)):
        magnitude_trim_(d, dens, i, scope=scope, ctx=ctx, rescale=rescale)
    return linear_combine_(base, deltas, weight, lambda_=lambda_, normalize=normalize)
