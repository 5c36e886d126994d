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
- Row chunks (`splice.engine.chunks`): the ranks are within last-axis rows, which a row
  chunk of a tensor of 2 or more dimensions holds whole, and torch draws a Bernoulli mask
  with a float32 probability tensor serially, one 32-bit word of the generator per entry
  whatever the probability, so a chunk's mask is the tensor's stream from the chunk's first
  flat entry (``ctx.flat_offset``; the entries before it drawn and discarded, checked once
  per process: `magprune_draws_split`); the inverse rescale or none and the combines are
  elementwise. Not chunked: the L1 rescale (norms over the whole tensor), 1-D tensors (one
  row).
"""

from collections.abc import Callable, Mapping
from functools import cache
from typing import Annotated, Any

import torch
from pydantic import Field
from torch import Tensor

from splice.errors import MergeValidationError
from splice.merge.methods._common import UnitFloat, linear_combine_, ties_combine_
from splice.merge.methods._compose import compose
from splice.merge.registry import Dialect, MergeContext, PerModel
from splice.merge.sparsify import (
    SKIP_BLOCK,
    Rescale,
    discard_draws,
    drop_,
    l1_threads,
    l1_work,
    rescale_mode,
    rows_view,
)

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


def magprune_mask(prob: Tensor, generator: torch.Generator, offset: int = 0) -> Tensor:
    """Bool keep-mask, entry e kept with probability ``prob[e]`` (float32, drawn on the CPU):
    the draws of entries ``offset`` … of a mask drawn over the whole flat tensor (a row
    chunk's part), the ``offset`` entries before it drawn and discarded (`discard_draws`;
    one word each whatever the probability: `magprune_draws_split`)."""
    discard_draws(offset, lambda m: torch.bernoulli(torch.zeros(m), generator=generator))
    return torch.bernoulli(prob.float(), generator=generator).bool()


@cache
def magprune_draws_split() -> bool:
    """Whether a mask drawn after discarding the entries before it (`magprune_mask` with an
    offset) is that slice of the mask drawn at once, for a few sizes, offsets and
    probabilities (across ``SKIP_BLOCK`` too); checked once per process. A torch that draws
    otherwise keeps DELLA unchunked."""
    g = torch.Generator().manual_seed(20240603)
    for n, offset in ((1, 1), (7, 5), (300, 1000), (64, SKIP_BLOCK + 3)):
        prob = torch.rand(offset + n, generator=g)
        seed = int(torch.randint(0, 2**62, (1,), generator=g))
        whole = magprune_mask(prob, torch.Generator().manual_seed(seed))
        part = magprune_mask(prob[offset:], torch.Generator().manual_seed(seed), offset)
        if not torch.equal(part, whole[offset:]):
            return False
    return True


def della_chunks(params: Mapping[str, Any], dialect: Dialect, ndim: int) -> bool:
    """``row_chunks`` of DELLA: a row chunk holds whole last-axis rows (2 or more dimensions),
    its mask is the tensor's stream from its first flat entry, and the rescale is elementwise
    (inverse or none; not the L1 rescale's whole-tensor norms)."""
    l1 = rescale_mode(params["rescale"]) == "l1"
    return ndim >= 2 and not l1 and magprune_draws_split()


def magprune_(
    delta: Tensor,
    density: float,
    epsilon: float,
    rescale: Rescale,
    generator: torch.Generator,
    threads: int = 1,
    offset: int = 0,
    work: Tensor | None = None,
) -> Tensor:
    """DELLA's MagPrune of one task vector, in place (``threads``, ``work``: the order of the
    L1 rescale's sums and their |δ| buffer, `splice.merge.sparsify.l1_sum`; ``offset``: δ's
    first entry's place in the flat tensor whose mask is drawn, a row chunk's first flat
    entry)."""
    if density >= 1:
        return delta
    if density <= 0:
        return delta.zero_()
    prob = magprune_keep_prob(delta.cpu(), density, epsilon)
    mask = magprune_mask(prob, generator, offset)
    return drop_(delta, mask, rescale, prob, threads=threads, work=work)


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
        threads = l1_threads(ctx.dialect)
        work = l1_work(deltas) if rescale_mode(rescale) == "l1" else None  # one |δ| buffer
        for i, (d, dens, eps) in enumerate(zip(deltas, density, epsilon, strict=True)):
            magprune_(d, dens, eps, rescale, ctx.generator(i), threads, ctx.flat_offset, work)

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
        row_chunks=della_chunks,
    )
