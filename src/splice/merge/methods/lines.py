"""LiNeS (Wang et al. 2025, "LiNeS: Post-training Layer Scaling Prevents Forgetting and
Enhances Model Merging"; reference code ``LiNeS_scaling``): scale a task vector linearly
with depth, so that shallow layers (general features) change little and deep layers keep
their task-specific update.

For a tensor in layer l of a model with L layers (l = 0 … L−1, from the tensor's name):

    s(l) = α + β · l / (L − 1)
    merged = base + s(l) · Σ_i w_i (θ_i − base)

Tensors outside layers (embeddings, final norm, head) get s = α, as in the reference code
(``layer_scalings.get(name, alpha)``); a one-layer model has s = α.

Choices:
- ``alpha`` and ``beta`` are required. The paper has no universal defaults: for editing a
  single fine-tuned model it uses α small and α + β = 1 (the last layer keeps the full
  update); for multi-task merging both are tuned (α is usually near the merging method's
  own scaling, e.g. 1/T for a sum of T task vectors).
- The merged task vector here is task arithmetic's (Σ w_i δ_i). As a post-step of any
  base-using method, a recipe's ``lines: {alpha, beta}`` key makes the engine scale that
  method's merged task vector (merged − base) by the same s(l): the engine applies the
  typed request `DepthScale` (`splice.merge.stats`) generically, it imports no method.
- s(l) is the answer to the declared request `DepthScale(alpha, beta)`, from the engine's
  layer context (``ctx.layer_index`` / ``ctx.num_layers``); called without it (a bare
  tensor), every tensor is "outside layers" and gets α.
"""

from collections.abc import Sequence

from torch import Tensor

from splice.merge.methods._common import deltas_, linear_combine_
from splice.merge.registry import MergeContext, PerModel, merge_method
from splice.merge.stats import DepthScale


@merge_method("lines", needs_base=True, model_stats=lambda p: [DepthScale(p["alpha"], p["beta"])])
def lines(
    base: Tensor,
    tensors: Sequence[Tensor],
    *,
    alpha: float,
    beta: float,
    weight: PerModel[float] = 1.0,
    ctx: MergeContext,
) -> Tensor:
    """Task arithmetic with the task vector scaled linearly with layer depth."""
    scale = ctx.stat(DepthScale(alpha, beta))
    return linear_combine_(base, deltas_(base, tensors), weight, lambda_=scale, normalize=False)
