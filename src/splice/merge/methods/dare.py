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

import torch
from torch import Tensor

from splice.merge.methods._common import UnitFloat, linear_combine_, ties_combine_
from splice.merge.methods._compose import compose
from splice.merge.registry import MergeContext, PerModel
from splice.merge.sparsify import Rescale, drop_


def dare_mask(shape: torch.Size, density: float, generator: torch.Generator) -> Tensor:
    """Bool keep-mask, each entry kept with probability ``density`` (drawn on the CPU)."""
    return torch.empty(shape, dtype=torch.bool).bernoulli_(density, generator=generator)


def dare_apply_(delta: Tensor, mask: Tensor, density: float, rescale: Rescale) -> Tensor:
    """Zero the dropped entries of ``delta`` (in place) and rescale the kept ones."""
    return drop_(delta, mask, rescale, density)


def dare_(
    deltas: list[Tensor],
    *,
    density: PerModel[UnitFloat],
    rescale: Rescale = "inverse",
    ctx: MergeContext,
) -> None:
    """Drop each entry of δ_i with probability 1 − density_i, rescale the rest (in place)."""
    for i, (d, dens) in enumerate(zip(deltas, density, strict=True)):
        if dens < 1:
            dare_apply_(d, dare_mask(d.shape, dens, ctx.generator(i)), dens, rescale)


_MERGEKIT = {"density": 1.0, "rescale": True}
compose(
    "dare_linear",
    dare_,
    linear_combine_,
    summary="Randomly drop task-vector entries, rescale, then task arithmetic.",
    random=True,
    mergekit_defaults=_MERGEKIT,
    mergekit_ignored={"int8_mask"},
)
compose(
    "dare_ties",
    dare_,
    ties_combine_,
    summary="Randomly drop task-vector entries, rescale, then TIES sign election and merge.",
    random=True,
    mergekit_defaults={**_MERGEKIT, "normalize": False},
    mergekit_ignored={"int8_mask"},
)
