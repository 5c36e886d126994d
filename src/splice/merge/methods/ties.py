"""TIES-Merging (Yadav et al. 2023, "Resolving Interference When Merging Models").

    δ_i = θ_i − base
    δ̂_i = trim(δ_i, density_i)        keep the largest-|δ_i| entries, zero the rest
    v_i = w_i · δ̂_i
    s   = sign⁺(Σ_i v_i)              majority="sum" (paper); "count": sign⁺(Σ_i sign(v_i))
                                      sign⁺(x) = +1 for x >= 0, −1 otherwise
    A_i = [sign(v_i) == s]            an entry agrees with the elected sign (0 never agrees)
    δ   = Σ_i A_i v_i / Σ_i A_i w_i   disjoint="mean" (a zero divisor counts as 1)
        = Σ_i A_i v_i                 disjoint="sum"
        = s · max_i A_i |v_i|         disjoint="max"
    merged = base + λ · δ

Order of operations as mergekit's generalized task arithmetic (trim the unweighted δ_i,
then weight, elect, merge, normalize, scale by λ).

Choices:
- Trim scope. ``scope="model"`` (splice default, the paper): keep exactly
  round(density_i · N) entries of δ_i over the whole model (N = all merged entries but
  those of a tensor every model keeps whole, density 0 or 1 there through a filter), via
  the engine's whole-model `KeepRule`. ``scope="tensor"`` (mergekit default): keep the top
  entries of each tensor on its own; splice dialect keeps exactly round(density_i · n),
  mergekit dialect max(1, int(density_i · n)). Equal magnitudes at the threshold: the
  first in flat order; in the mergekit dialect, the ones torch's (unstable) sort puts
  first, as mergekit (only such tensors are sorted; common with bf16 task vectors).
- ``disjoint`` vs mergekit's ``normalize``: ``disjoint``, when given, wins; otherwise
  normalize=true means disjoint="mean" and normalize=false means disjoint="sum".
- ``weighted_votes: false``: the sign is elected on the unweighted δ̂_i, s = sign⁺(Σ_i δ̂_i),
  and A_i = [sign(δ̂_i) == s]; then the agreeing v_i = w_i δ̂_i are combined as above.
  With disjoint "sum" this is AdaMerging++'s merge (`splice.train.adamerging`: TIES
  vectors elected once, then weighted by the learned λ), which `splice search --objective
  adamerging++` writes. Not a mergekit option (the mergekit dialect computes it in splice's
  float32 arithmetic).
- ``rescale: true`` multiplies each trimmed δ̂_i to restore the L1 norm of δ_i (mergekit).

``magnitude_prune``: the same trim, then task arithmetic (TIES without sign election; no
mergekit method of that name, ``density`` required):

    merged = base + λ · Σ_i w_i δ̂_i          [/ Σ_i w_i when normalize, |Σ w| >= 1e-8]
"""

from torch import Tensor

from splice.merge.methods._common import (
    TrimScope,
    UnitFloat,
    linear_combine_,
    magnitude_trim_,
    ties_combine_,
    trim_chunks,
    trim_requests,
)
from splice.merge.methods._compose import compose
from splice.merge.registry import MergeContext, PerModel
from splice.merge.sparsify import l1_work


def trim_(
    deltas: list[Tensor],
    *,
    density: PerModel[UnitFloat],
    rescale: bool = False,
    scope: TrimScope = "model",
    ctx: MergeContext,
) -> None:
    """Keep the round(density_i · n) largest-|δ_i| entries of each task vector (in place)."""
    work = l1_work(deltas) if rescale else None  # one |δ| buffer for every L1 sum
    for i, (d, dens) in enumerate(zip(deltas, density, strict=True)):
        magnitude_trim_(d, dens, i, scope=scope, ctx=ctx, rescale=rescale, work=work)


compose(
    "ties",
    trim_,
    ties_combine_,
    summary="Trim each task vector by magnitude, elect a sign per entry, average the agreeing.",
    defaults={"density": 1.0},
    mergekit_defaults={"scope": "tensor"},
    mergekit_ignored={"int8_mask"},
    model_stats=trim_requests,
    row_chunks=trim_chunks,
)
compose(
    "magnitude_prune",
    trim_,
    linear_combine_,
    summary="Keep the largest entries of each task vector, then add their weighted sum.",
    model_stats=trim_requests,
    row_chunks=trim_chunks,
)
