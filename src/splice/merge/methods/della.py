"""DELLA (Deep et al. 2024, "DELLA-Merging: Reducing Interference in Model Merging through
Magnitude-Based Sampling"): MagPrune, then TIES-style (``della``) or linear
(``della_linear``) merging.

MagPrune, for each task vector δ_i = θ_i − base with density d_i and spread ε_i, row by row
(a row is the last axis; a 1-D tensor is one row) with n entries:

    r      = rank of |δ| within the row, 0 = smallest … n − 1 = largest
    k      = (d − ε) + 2ε · r / (n − 1)          keep probability, linear in the rank
                                                  (drop probability p = 1 − k ∈ [1−d−ε, 1−d+ε])
    m      ~ Bernoulli(k) per entry
    δ̂      = rescale(m ⊙ δ)

Then ``della``: TIES sign election and disjoint merge of w_i δ̂_i (see `ties`);
``della_linear``: base + λ · Σ_i w_i δ̂_i [/ Σ_i w_i when normalize].

Reference: mergekit's ``della_magprune`` (``mergekit/sparsify.py``, contributed by the
paper's authors) and its ``della`` / ``della_linear`` registrations; parameter names and
mergekit-dialect defaults follow it (``density`` 1 = no-op, ``epsilon`` 0.15, ``rescale``
true, ``normalize`` true for ``della`` and false for ``della_linear``, ``int8_mask``
accepted and ignored). Choices:
- Rescale: "inverse" (splice default, the paper): each kept entry divided by its own keep
  probability k (= 1/(1 − p_i)), so E[δ̂] = δ; "l1" (mergekit's ``rescale: true``): the
  kept entries scaled to the L1 norm of δ (whole tensor); "none". Booleans mean what
  they mean in mergekit.
- Ranks: mergekit ranks along dim 1 (rows of a 2-D tensor; the single row of a 1-D one);
  we rank along the last axis, which is the same for 1-D and 2-D tensors and differs for
  tensors with 3 or more dimensions. Equal magnitudes get consecutive ranks in flat order
  (a stable sort; mergekit's sort is unstable). A row of one entry gets k = d (mergekit
  divides 0 by 0 there).
- ``density`` is required in the splice dialect; 0 < d − ε and d + ε < 1 is required when
  0 < d < 1 (mergekit's rule); d >= 1 keeps δ as is, d = 0 drops everything.
- Randomness: ``ctx.generator(i)`` for model i, drawn on the CPU (reproducible; cannot
  match mergekit's draws from the global torch RNG).
"""

from collections.abc import Callable
from typing import Annotated

import torch
from pydantic import Field
from torch import Tensor

from splice.errors import MergeValidationError
from splice.merge.methods._common import UnitFloat, linear_combine_, ties_combine_
from splice.merge.methods._compose import compose
from splice.merge.registry import MergeContext, PerModel
from splice.merge.sparsify import Rescale, drop_, l1_threads, rows_view

Epsilon = Annotated[float, Field(ge=0, lt=1)]


def magprune_keep_prob(delta: Tensor, density: float, epsilon: float) -> Tensor:
    """Keep probabilities (float32, shape of ``delta``): linear in the magnitude rank of
    each entry within its row, from d − ε (smallest) to d + ε (largest)."""
    rows = rows_view(delta)
    n = rows.shape[1]
    if n <= 1:
        return torch.full(delta.shape, density, dtype=torch.float32)
    order = torch.argsort(rows.abs().float(), dim=1, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(n).expand_as(order).contiguous())
    prob = ranks.float().mul_(2 * epsilon / (n - 1)).add_(density - epsilon)
    return prob.reshape(delta.shape)


def magprune_mask(prob: Tensor, generator: torch.Generator) -> Tensor:
    """Bool keep-mask, entry e kept with probability ``prob[e]`` (drawn on the CPU)."""
    return torch.bernoulli(prob, generator=generator).bool()


def magprune_(
    delta: Tensor,
    density: float,
    epsilon: float,
    rescale: Rescale,
    generator: torch.Generator,
    threads: int = 1,
) -> Tensor:
    """DELLA's MagPrune of one task vector, in place (``threads``: the order of the L1
    rescale's sums, `splice.merge.sparsify.l1_sum`)."""
    if density >= 1:
        return delta
    if density <= 0:
        return delta.zero_()
    prob = magprune_keep_prob(delta.cpu(), density, epsilon)
    return drop_(delta, magprune_mask(prob, generator), rescale, prob, threads=threads)


def magprune_sparsifier(method: str) -> Callable[..., None]:
    """DELLA's sparsifier (MagPrune of every task vector) for ``method``, which its error
    message names."""

    def magprune_all_(
        deltas: list[Tensor],
        *,
        density: PerModel[UnitFloat],
        epsilon: PerModel[Epsilon] = 0.15,
        rescale: Rescale = "inverse",
        ctx: MergeContext,
    ) -> None:
        for i, (d, e) in enumerate(zip(density, epsilon, strict=True)):
            if 0 < d < 1 and not (d - e > 0 and d + e < 1):
                raise MergeValidationError(
                    f"method '{method}': model {i}: density ± epsilon must lie in (0, 1), "
                    f"got density {d}, epsilon {e}"
                )
        for i, (d, dens, eps) in enumerate(zip(deltas, density, epsilon, strict=True)):
            magprune_(d, dens, eps, rescale, ctx.generator(i), l1_threads(ctx.dialect))

    return magprune_all_


for _name, _combine, _then in (
    ("della", ties_combine_, "TIES sign election and disjoint merge"),
    ("della_linear", linear_combine_, "task arithmetic"),
):
    compose(
        _name,
        magprune_sparsifier(_name),
        _combine,
        summary=f"MagPrune (rank-based random drop), then {_then}.",
        random=True,
        mergekit_defaults={"density": 1.0, "rescale": True},
        mergekit_ignored={"int8_mask"},
    )
