"""Model Breadcrumbs (Davari & Belilovsky 2023, "Model Breadcrumbs: Scaling Multi-Task
Model Merging with Sparse Masks").

Each task vector δ_i = θ_i − base is masked to a band of magnitudes: drop the largest
(outliers), drop the smallest, keep the middle. Within one unit of n entries (a row or a
whole tensor, see ``scope``):

    keep  = round(density_i · n)    splice      int(density_i · n)   mergekit
    top   = round(gamma_i · n)      splice      int(gamma_i · n)     mergekit
    skip  = min(top, n − keep)      outlier removal shrinks so that ``keep`` entries remain
    mask  = entries ranked skip+1 … skip+keep by |δ_i| (largest first)

This equals mergekit's rule (ascending sort, keep positions [n_bot, n_bot + keep) with
n_bot = max(0, n − keep − top)). Equal magnitudes straddling a boundary: the first in
flat order (splice dialect), or torch's sort order as in mergekit (mergekit dialect,
tensor scope; the tensor is then sorted). Then

    breadcrumbs:      merged = base + λ · Σ_i w_i δ̂_i   [/ Σ_i w_i when normalize]
    breadcrumbs_ties: TIES sign election + disjoint merge of w_i δ̂_i (see `ties`)

Choices:
- ``scope="row"`` (splice default, as the authors' code): one unit per vector along the
  last axis (the output rows of a 2-D weight; a 1-D tensor is one row).
  ``scope="tensor"`` (mergekit default): the flattened tensor is one unit.
- ``density`` is required in the splice dialect (mergekit defaults it to 1, where the
  method changes nothing); ``gamma`` defaults to 0.01 in both dialects.
- ``rescale: true`` restores each δ_i's L1 norm (over the whole tensor) after masking.
- breadcrumbs_ties: normalize defaults to true in splice (disjoint mean, as `ties`) and
  false in mergekit; ``disjoint``, when given, wins over ``normalize``.
"""

from typing import Literal

from torch import Tensor

from splice.delta.topk import band_mask_rows, magnitude
from splice.merge.methods._common import UnitFloat, l1_norm, linear_combine_, ties_combine_
from splice.merge.methods._compose import compose
from splice.merge.registry import Dialect, MergeContext, PerModel
from splice.merge.sparsify import drop_, l1_threads, l1_work, rows_view

RowScope = Literal["row", "tensor"]


def breadcrumbs_counts(n: int, density: float, gamma: float, dialect: Dialect) -> tuple[int, int]:
    """(skip, keep) for a unit of ``n`` entries: skip the ``skip`` largest, keep the next
    ``keep``."""
    if dialect == "mergekit":
        keep, top = int(density * n), int(gamma * n)
    else:
        keep, top = round(density * n), round(gamma * n)
    keep = max(0, min(n, keep))
    return max(0, min(top, n - keep)), keep


def breadcrumbs_mask_(
    delta: Tensor,
    density: float,
    gamma: float,
    *,
    scope: str,
    dialect: Dialect,
    rescale: bool,
    work: Tensor | None = None,
) -> Tensor:
    """Mask one task vector to its middle band of magnitudes (in place; ``work``: the |δ|
    buffer of the L1 rescale's sums, `splice.merge.sparsify.l1_work`)."""
    if density >= 1:
        return delta
    mag = magnitude(delta)
    rows = rows_view(mag) if scope == "row" else mag.reshape(1, -1)
    skip, keep = breadcrumbs_counts(rows.shape[1], density, gamma, dialect)
    ties = "torch_sort" if dialect == "mergekit" else "flat"
    mask = band_mask_rows(rows, skip, keep, ties).reshape(delta.shape)
    l1 = l1_norm(delta, mag, dialect, work) if rescale else None
    del mag, rows
    return drop_(delta, mask, rescale, l1=l1, threads=l1_threads(dialect), work=work)


def band_(
    deltas: list[Tensor],
    *,
    density: PerModel[UnitFloat],
    gamma: PerModel[UnitFloat] = 0.01,
    rescale: bool = False,
    scope: RowScope = "row",
    ctx: MergeContext,
) -> None:
    """Keep each task vector's density_i band of magnitudes below its top gamma_i (in place)."""
    work = l1_work(deltas) if rescale else None  # one |δ| buffer for every L1 sum
    for d, dens, g in zip(deltas, density, gamma, strict=True):
        breadcrumbs_mask_(d, dens, g, scope=scope, dialect=ctx.dialect, rescale=rescale, work=work)


_MERGEKIT = {"density": 1.0, "scope": "tensor"}
compose(
    "breadcrumbs",
    band_,
    linear_combine_,
    summary="Drop the largest and smallest task-vector entries, then task arithmetic.",
    mergekit_defaults=_MERGEKIT,
    mergekit_ignored={"int8_mask"},
)
compose(
    "breadcrumbs_ties",
    band_,
    ties_combine_,
    summary="Breadcrumbs masks, then TIES sign election and disjoint merge.",
    mergekit_defaults={**_MERGEKIT, "normalize": False},
    mergekit_ignored={"int8_mask"},
)
