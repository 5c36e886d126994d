"""DARE: Drop And REscale (Yu et al. 2024, "Language Models are Super Mario").

    δ_i  = θ_i − base
    m_i  ~ Bernoulli(density_i) per entry      (drop probability p_i = 1 − density_i)
    δ̂_i = rescale(m_i ⊙ δ_i)
    dare_linear: merged = base + λ · Σ_i w_i δ̂_i   [/ Σ_i w_i when normalize]
    dare_ties:   TIES sign election + disjoint merge of w_i δ̂_i (see `ties`)

Rescale:
- "inverse" (splice default, the paper): δ̂ = m ⊙ δ / density, which keeps E[δ̂] = δ.
- "l1" (mergekit's ``rescale: true``, its default): δ̂ = m ⊙ δ · |δ|_1 / |m ⊙ δ|_1
  (unchanged when either norm < 1e-7).
- "none" (mergekit's ``rescale: false``): δ̂ = m ⊙ δ.
A boolean always has mergekit's meaning: true = "l1", false = "none".
density >= 1 leaves δ untouched; density 0 drops everything.

Randomness: the mask of model i comes from ``ctx.generator(i)`` (seeded from the merge
seed, the tensor name and i), drawn on the CPU, so a merge is reproducible and independent
of device, thread count and execution order. It cannot match mergekit's masks (mergekit
uses the global torch RNG).

Defaults: ``density`` is required in the splice dialect (mergekit defaults it to 1, which
makes DARE a no-op). dare_ties: normalize defaults to true in splice (TIES' disjoint mean,
as in the paper's DARE+TIES) and false in mergekit; ``disjoint``, when given, wins over
``normalize``.
"""

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

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
from splice.merge.sparsify import rescale_inverse, rescale_l1

Rescale = Literal["inverse", "l1", "none"] | bool


def dare_mask(shape: torch.Size, density: float, generator: torch.Generator) -> Tensor:
    """Bool keep-mask, each entry kept with probability ``density`` (drawn on the CPU)."""
    return torch.empty(shape, dtype=torch.bool).bernoulli_(density, generator=generator)


def dare_apply_(delta: Tensor, mask: Tensor, density: float, rescale: str | bool) -> Tensor:
    """Zero the dropped entries of ``delta`` (in place) and rescale the kept ones."""
    mode = "l1" if rescale is True else "none" if rescale is False else rescale
    l1 = delta.abs().sum() if mode == "l1" else None
    delta.mul_(mask.to(delta.device))
    if mode == "inverse":
        rescale_inverse(delta, density)
    elif l1 is not None:
        rescale_l1(l1, delta)
    return delta


def _dare_deltas(
    base: Tensor,
    tensors: Sequence[Tensor],
    density: Sequence[float],
    rescale: str | bool,
    ctx: MergeContext,
) -> list[Tensor]:
    deltas = deltas_(base, tensors)
    for i, (d, dens) in enumerate(zip(deltas, density, strict=True)):
        if dens < 1:
            dare_apply_(d, dare_mask(d.shape, dens, ctx.generator(i)), dens, rescale)
    return deltas


@merge_method(
    "dare_linear",
    needs_base=True,
    random=True,
    mergekit_defaults={"density": 1.0, "rescale": True},
    mergekit_ignored={"int8_mask"},
)
def dare_linear(
    base: Tensor,
    tensors: Sequence[Tensor],
    *,
    weight: PerModel[float] = 1.0,
    density: PerModel[UnitFloat],
    lambda_: float = 1.0,
    normalize: bool = False,
    rescale: Rescale = "inverse",
    ctx: MergeContext,
) -> Tensor:
    """Randomly drop task-vector entries, rescale, then task arithmetic."""
    deltas = _dare_deltas(base, tensors, density, rescale, ctx)
    return linear_combine_(base, deltas, weight, lambda_=lambda_, normalize=normalize)


@merge_method(
    "dare_ties",
    needs_base=True,
    random=True,
    mergekit_defaults={"density": 1.0, "rescale": True, "normalize": False},
    mergekit_ignored={"int8_mask"},
)
def dare_ties(
    base: Tensor,
    tensors: Sequence[Tensor],
    *,
    weight: PerModel[float] = 1.0,
    density: PerModel[UnitFloat],
    lambda_: float = 1.0,
    normalize: bool = True,
    disjoint: Disjoint | None = None,
    majority: Majority = "sum",
    rescale: Rescale = "inverse",
    ctx: MergeContext,
) -> Tensor:
    """Randomly drop task-vector entries, rescale, then TIES sign election and merge."""
    deltas = _dare_deltas(base, tensors, density, rescale, ctx)
    return ties_combine_(
        base,
        deltas,
        weight,
        lambda_=lambda_,
        majority=majority,
        disjoint=resolve_disjoint(disjoint, normalize),
    )
