"""Task arithmetic (Ilharco et al. 2023, "Editing Models with Task Arithmetic").

    merged = base + λ · Σ_i w_i (θ_i − base)            (normalize = False)
    merged = base + λ · Σ_i w_i (θ_i − base) / Σ_i w_i  (normalize = True)

Same as mergekit's ``task_arithmetic`` (normalize defaults to False there too; a weight
sum with |Σ w| < 1e-8 is not divided by), with mergekit's order of operations, so fp32
results are bit-identical: each δ_i is multiplied by w_i, then the products are summed.
"""

from collections.abc import Sequence

from torch import Tensor

from splice.merge.methods._common import deltas_, linear_combine_
from splice.merge.registry import PerModel, merge_method


@merge_method(
    "task_arithmetic",
    needs_base=True,
    # mergekit's generalized task arithmetic accepts these for every variant; here they
    # have no effect in mergekit either.
    mergekit_ignored={"int8_mask", "density", "rescale"},
)
def task_arithmetic(
    base: Tensor,
    tensors: Sequence[Tensor],
    *,
    weight: PerModel[float] = 1.0,
    lambda_: float = 1.0,
    normalize: bool = False,
) -> Tensor:
    """Add the weighted sum of task vectors to the base, scaled by λ."""
    return linear_combine_(
        base, deltas_(base, tensors), weight, lambda_=lambda_, normalize=normalize
    )
