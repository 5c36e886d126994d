"""Linear merge / model soup (Wortsman et al. 2022, "Model soups").

    merged = Σ_i w_i θ_i                 (normalize = False)
    merged = Σ_i w_i θ_i / Σ_i w_i       (normalize = True, the default in both dialects)

No base model is used. Same as mergekit's ``linear`` except that a weight sum of exactly 0
with normalize = True is an error here (mergekit divides by zero and writes inf/NaN).
"""

from collections.abc import Sequence

from torch import Tensor

from splice.errors import MergeValidationError
from splice.merge.methods._common import elementwise, own_inputs
from splice.merge.methods._mergekit_precision import linear_float32, mergekit_low_precision
from splice.merge.registry import MergeContext, PerModel, merge_method


@merge_method("linear", needs_base=False, row_chunks=elementwise)
def linear(
    base: Tensor | None,
    tensors: Sequence[Tensor],
    *,
    weight: PerModel[float] = 1.0,
    normalize: bool = True,
    ctx: MergeContext,
) -> Tensor:
    """Weighted average (or weighted sum) of the input models."""
    total = sum(weight)
    if normalize and total == 0:
        raise MergeValidationError(
            f"tensor '{ctx.tensor_name}': linear weights {list(weight)} sum to 0, so "
            "normalize cannot divide by their sum; set normalize: false or change the weights"
        )
    if mergekit_low_precision(ctx, tensors[0].dtype):
        return linear_float32(tensors, weight, normalize)
    inputs = own_inputs(None, tensors)
    merged = inputs[0].mul_(weight[0])
    for t, w in zip(inputs[1:], weight[1:], strict=True):
        merged.add_(t, alpha=w)
    if normalize:
        merged.div_(total)
    return merged
