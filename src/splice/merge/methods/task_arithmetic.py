"""Task arithmetic (Ilharco et al. 2023, "Editing Models with Task Arithmetic").

    merged = base + λ · Σ_i w_i (θ_i − base)            (normalize = False)
    merged = base + λ · Σ_i w_i (θ_i − base) / Σ_i w_i  (normalize = True)

Same as mergekit's ``task_arithmetic`` (normalize defaults to False there too; a weight
sum with |Σ w| < 1e-8 is not divided by), with mergekit's order of operations, so fp32
results are bit-identical: each δ_i is multiplied by w_i, then the products are summed.
"""

from splice.merge.methods._common import elementwise, linear_combine_
from splice.merge.methods._compose import compose

compose(
    "task_arithmetic",
    None,
    linear_combine_,
    summary="Add the weighted sum of task vectors to the base, scaled by λ.",
    # mergekit's generalized task arithmetic accepts these for every variant; here they
    # have no effect in mergekit either.
    mergekit_ignored={"int8_mask", "density", "rescale"},
    row_chunks=elementwise,
)
