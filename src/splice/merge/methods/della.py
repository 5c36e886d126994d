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

from collections.abc import Sequence
from typing import Annotated, Literal

import torch
from pydantic import Field
from torch import Tensor

from splice.errors import MergeValidationError
from splice.merge.methods._common import (
    Disjoint,
    Majority,
    UnitFloat,
    deltas_,
    linear_combine_,
    resolve_disjoint,
    ties_combine_,
)
from splice.merge.registry import MergeContext, PerModel, merge_method
from splice.merge.sparsify import rescale_l1, rows_view

Rescale = Literal["inverse", "l1", "none"] | bool
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
    rescale: str | bool,
    generator: torch.Generator,
) -> Tensor:
    """DELLA's MagPrune of one task vector, in place."""
    if density >= 1:
        return delta
    if density <= 0:
        return delta.zero_()
    prob = magprune_keep_prob(delta.cpu(), density, epsilon)
    mask = magprune_mask(prob, generator)
    mode = "l1" if rescale is True else "none" if rescale is False else rescale
    l1 = delta.abs().sum() if mode == "l1" else None
    delta.mul_(mask.to(delta.device))
    if mode == "inverse":
        delta.div_(prob.to(delta.device, delta.dtype))
    elif l1 is not None:
        rescale_l1(l1, delta)
    return delta


def _check(density: Sequence[float], epsilon: Sequence[float], method: str) -> None:
    for i, (d, e) in enumerate(zip(density, epsilon, strict=True)):
        if 0 < d < 1 and not (d - e > 0 and d + e < 1):
            raise MergeValidationError(
                f"method '{method}': model {i}: density ± epsilon must lie in (0, 1), "
                f"got density {d}, epsilon {e}"
            )


def _pruned(
    base: Tensor,
    tensors: Sequence[Tensor],
    density: Sequence[float],
    epsilon: Sequence[float],
    rescale: str | bool,
    ctx: MergeContext,
    method: str,
) -> list[Tensor]:
    _check(density, epsilon, method)
    deltas = deltas_(base, tensors)
    for i, (d, dens, eps) in enumerate(zip(deltas, density, epsilon, strict=True)):
        magprune_(d, dens, eps, rescale, ctx.generator(i))
    return deltas


_MERGEKIT = {"density": 1.0, "rescale": True}


@merge_method(
    "della",
    needs_base=True,
    random=True,
    mergekit_defaults=_MERGEKIT,
    mergekit_ignored={"int8_mask"},
)
def della(
    base: Tensor,
    tensors: Sequence[Tensor],
    *,
    weight: PerModel[float] = 1.0,
    density: PerModel[UnitFloat],
    epsilon: PerModel[Epsilon] = 0.15,
    lambda_: float = 1.0,
    normalize: bool = True,
    disjoint: Disjoint | None = None,
    majority: Majority = "sum",
    rescale: Rescale = "inverse",
    ctx: MergeContext,
) -> Tensor:
    """MagPrune (rank-based random drop), then TIES sign election and disjoint merge."""
    deltas = _pruned(base, tensors, density, epsilon, rescale, ctx, "della")
    return ties_combine_(
        base,
        deltas,
        weight,
        lambda_=lambda_,
        majority=majority,
        disjoint=resolve_disjoint(disjoint, normalize),
    )


@merge_method(
    "della_linear",
    needs_base=True,
    random=True,
    mergekit_defaults=_MERGEKIT,
    mergekit_ignored={"int8_mask"},
)
def della_linear(
    base: Tensor,
    tensors: Sequence[Tensor],
    *,
    weight: PerModel[float] = 1.0,
    density: PerModel[UnitFloat],
    epsilon: PerModel[Epsilon] = 0.15,
    lambda_: float = 1.0,
    normalize: bool = False,
    rescale: Rescale = "inverse",
    ctx: MergeContext,
) -> Tensor:
    """MagPrune (rank-based random drop), then task arithmetic."""
    deltas = _pruned(base, tensors, density, epsilon, rescale, ctx, "della_linear")
    return linear_combine_(base, deltas, weight, lambda_=lambda_, normalize=normalize)
