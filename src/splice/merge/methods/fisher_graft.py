"""Fast Fisher Grafting (FFG; Mahdavinia et al. 2025, "Harnessing Optimization Dynamics for
Curvature-Informed Model Merging") as a sparsifier of task vectors, with the diagonal Fisher
of each model (`splice stats fisher`, `splice.merge.data_stats.collect_fisher`) as the
curvature:

    δ_i    = θ_i − base
    s_i    = F_i ⊙ δ_i²                    saliency (the loss increase of resetting an entry
                                           to the base under a diagonal quadratic model,
                                           up to the factor ½)
    δ̂_i    = δ_i ⊙ [s_i among the round(density_i · n) largest of the tensor]
    merged = base + λ · Σ_i w_i δ̂_i        [/ Σ_i w_i when normalize]   (task arithmetic)

Entries not kept are grafted back to the base ("fallback to base"). With a constant Fisher
this is magnitude pruning (`magnitude_prune` with ``scope: tensor``); the Fisher moves the
kept entries to where the loss is curved.

Choices: the authors take Adam's second moments (``exp_avg_sq``) as the curvature and mask by
a per-model threshold on s (their ``precond_threshold``) or a density; here the curvature is
the empirical Fisher splice collects, and the mask keeps a density per tensor (exactly
round(density · n) entries; ties at the boundary by flat order, as ``ties`` with ``scope:
tensor``). The kept task vectors are combined by task arithmetic (the authors' "linear"
post-FFG merge; their default OTA merge weights them by the curvature instead, which is
`fisher` merging of the grafted models). Needs a base model and a Fisher per merged model
(the recipe's ``statistics:``). Memory per tensor: the n inputs, their n Fishers and one
saliency tensor.
"""

from torch import Tensor

from splice.delta.topk import keep_count, topk_mask
from splice.errors import MergeValidationError
from splice.merge.methods._common import UnitFloat, linear_combine_
from splice.merge.methods._compose import compose
from splice.merge.registry import MergeContext, PerModel
from splice.merge.stats import DataStatistic

FISHER = DataStatistic("fisher")


def graft_(
    deltas: list[Tensor],
    *,
    density: PerModel[UnitFloat],
    ctx: MergeContext,
) -> None:
    """Keep each task vector's round(density_i · n) entries of largest F_i δ_i² (in place)."""
    fishers = ctx.stat(FISHER).per_model
    for i, (d, dens) in enumerate(zip(deltas, density, strict=True)):
        f = fishers[i]
        if f is None:
            raise MergeValidationError(
                f"tensor '{ctx.tensor_name}': model {i} has no Fisher for it (missing statistic)"
            )
        if dens >= 1:
            continue
        if dens <= 0:
            d.zero_()
            continue
        saliency = f.to(d.device, dtype=d.dtype).float() * d.float().square()
        d.mul_(topk_mask(saliency, keep_count(d.numel(), dens), "flat"))


compose(
    "fisher_graft",
    graft_,
    linear_combine_,
    summary="Fast Fisher Grafting: keep each task vector's highest-Fisher-saliency entries, "
    "then task arithmetic.",
    data_statistics=["fisher"],
)
