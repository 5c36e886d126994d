"""Fisher merging (Matena & Raffel 2022, "Merging Models with Fisher-Weighted Averaging").

Each model's parameters are weighted, entry by entry, by its diagonal Fisher F_i
(`splice.merge.data_stats.collect_fisher`):

    merged = Σ_i c_i F̂_i ⊙ θ_i / Σ_i c_i F̂_i,    F̂_i = max(F_i, floor)
    c_i = weight_i / ‖F_i‖        (normalize = True, the default)
    c_i = weight_i                (normalize = False)

‖F_i‖ is the L2 norm of model i's whole Fisher (all merged tensors), so models whose
Fishers differ in overall scale (e.g. different losses or data sizes) count by their
shape, not their size; both reference implementations normalize by default. ``floor``
(Matena & Raffel's ``fisher_floor``, default 1e-6) keeps the quotient defined where every
Fisher is zero; it is applied to every model (the reference's ``favor_target_model=False``;
its default applies it to the first model only). FusionBench adds 1e-6 instead of taking
the maximum and adds 1e-6 to the norms: the results differ by terms of order 1e-6 / F.
With equal Fishers this is the weighted average Σ w_i θ_i / Σ w_i.

No base model is used. Memory per tensor: the n inputs and their n Fishers.
"""

from collections.abc import Sequence
from typing import Annotated

from pydantic import Field
from torch import Tensor

from splice.errors import MergeValidationError
from splice.merge.registry import MergeContext, PerModel, merge_method
from splice.merge.stats import DataStatistic

FISHER = DataStatistic("fisher")


@merge_method("fisher", needs_base=False, data_statistics=["fisher"])
def fisher(
    base: Tensor | None,
    tensors: Sequence[Tensor],
    *,
    weight: PerModel[Annotated[float, Field(ge=0)]] = 1.0,
    floor: Annotated[float, Field(ge=0)] = 1e-6,
    normalize: bool = True,
    ctx: MergeContext,
) -> Tensor:
    """Fisher-weighted average of the input models (needs each model's diagonal Fisher)."""
    stats = ctx.stat(FISHER)
    if sum(weight) == 0:
        raise MergeValidationError(f"fisher weights {list(weight)} sum to 0")
    numerator = denominator = None
    for i, (theta, w) in enumerate(zip(tensors, weight, strict=True)):
        f = stats.per_model[i]
        if f is None:
            raise MergeValidationError(
                f"tensor '{ctx.tensor_name}': model {i} has no Fisher for it (missing statistic)"
            )
        if normalize:
            if stats.model_norms[i] == 0:
                raise MergeValidationError(
                    f"model {i}'s Fisher is zero everywhere; it cannot be normalized "
                    "(set normalize: false or check the data and loss)"
                )
            w = w / stats.model_norms[i]
        scaled = f.to(theta.device, theta.dtype).clamp_min(floor).mul_(w)
        numerator = scaled * theta if numerator is None else numerator.addcmul_(scaled, theta)
        denominator = scaled if denominator is None else denominator.add_(scaled)
    assert numerator is not None and denominator is not None
    if bool((denominator == 0).any()):
        raise MergeValidationError(
            f"tensor '{ctx.tensor_name}': every model's Fisher is zero at some entries; "
            "set floor > 0"
        )
    return numerator.div_(denominator)
