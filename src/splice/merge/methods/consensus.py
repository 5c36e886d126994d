"""Consensus merging with TALL masks (Wang et al. 2024, "Localizing Task Information for
Improved Model Merging and Compression").

    τ_t    = θ_t − base                          task vectors
    τ_MTL  = Σ_t τ_t                             the task-arithmetic multi-task vector
    m_t    = |τ_t| > λ_t · |τ_MTL − τ_t|         TALL mask of task t (λ_t = ``lambda_tall``)
    c      = [Σ_t m_t >= k]                      consensus: entries useful to >= k tasks
    merged = base + λ · (c ⊙ τ_MTL)

Reference implementation (``nik-dim/tall_masks``, ``generate_task_masks`` and
``construct_consensus_mask``):
- The mask compares |θ_0 − θ_t| with λ_t · |θ_MTL − θ_t| with a *strict* ``>``; we compute
  the same from the task vectors (θ_0 − θ_t = −τ_t, θ_MTL − θ_t = τ_MTL − τ_t).
- θ_MTL uses the plain sum Σ τ_t (task arithmetic with its default k=100: no trimming).
- k (``prun_thre_k``) defaults to 2: drops "selfish" (one task) and "catastrophic" (no
  task) weights; k=0 is task arithmetic, k > N keeps only the base.
- λ_t is picked per task on validation data from {0.2, 0.3, 0.4, 0.5, 0.6}; without
  validation data the default here is 0.4, the middle of that grid.
- The final scaling λ (the task-arithmetic coefficient) is picked on validation data
  there; the default here is 1.0 as for ``task_arithmetic``.
Every step is per entry, so merging tensor by tensor is exact.
"""

from collections.abc import Sequence
from typing import Annotated

import torch
from pydantic import Field
from torch import Tensor

from splice.merge.methods._common import add_scaled_, deltas_
from splice.merge.registry import PerModel, merge_method

NonNegative = Annotated[float, Field(ge=0)]


def tall_masks(
    deltas: Sequence[Tensor], total: Tensor, lambda_tall: Sequence[float]
) -> list[Tensor]:
    """TALL masks m_t = |τ_t| > λ_t · |τ_MTL − τ_t| (bool tensors), for τ_MTL = ``total``."""
    return [
        d.abs() > (total - d).abs_().mul_(lam) for d, lam in zip(deltas, lambda_tall, strict=True)
    ]


def task_sum(deltas: Sequence[Tensor]) -> Tensor:
    """τ_MTL = Σ_t τ_t (a new tensor)."""
    total = deltas[0].clone()
    for d in deltas[1:]:
        total.add_(d)
    return total


def consensus_mask(masks: Sequence[Tensor], k: int) -> Tensor:
    """Entries on in at least ``k`` of the masks."""
    count = torch.zeros(masks[0].shape, dtype=torch.int32, device=masks[0].device)
    for m in masks:
        count += m
    return count >= k


@merge_method("consensus", needs_base=True)
def consensus(
    base: Tensor,
    tensors: Sequence[Tensor],
    *,
    k: Annotated[int, Field(ge=0)] = 2,
    lambda_tall: PerModel[NonNegative] = 0.4,
    lambda_: float = 1.0,
) -> Tensor:
    """Task arithmetic restricted to the entries that at least k TALL masks keep."""
    if not tensors:
        return base
    deltas = deltas_(base, tensors)
    total = task_sum(deltas)
    keep = consensus_mask(tall_masks(deltas, total, lambda_tall), k)
    return add_scaled_(base, total.mul_(keep), lambda_)
