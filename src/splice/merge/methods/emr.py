"""EMR-Merging (Huang et al. 2024, "EMR-Merging: Tuning-Free High-Performance Model
Merging"): Elect, Mask and Rescale.

    τ_t    = θ_t − base
    γ      = +1 where Σ_t τ_t > 0, −1 elsewhere (an exact zero sum elects −1)
    M_t    = [τ_t ⊙ γ > 0]                       task t agrees with the elected sign
    ε      = max_t |M_t ⊙ τ_t|                    (0 where no task agrees)
    τ_uni  = γ ⊙ ε                                 the unified task vector
    λ_t    = Σ_n mean|τ_t,n| / Σ_n mean|M_t,n ⊙ τ_uni,n|      over the model's tensors n
    θ̂_t    = base + λ_t · M_t ⊙ τ_uni            the task-specific model

Reference implementation (``harveyhuang18/EMR_Merging``, ``emr_merge``): the sign is
elected from the mean of the task vectors with ``(mean > 0) * 2 - 1``; the rescalers are
*whole-model*: the per-tensor means of |τ_t| and of |M_t ⊙ τ_uni| are each summed over all
tensors, then divided. So the per-task models need every tensor and come from the
compression path (``splice compress emr``, ``splice.compress.emr``), which accumulates the
two sums while it streams.

As a merge method, ``emr`` returns ``base + τ_uni`` (no masks, no rescaling): the unified
model that the task-specific models are derived from. It has no parameters.
"""

from collections.abc import Sequence

import torch
from torch import Tensor

from splice.merge.methods._common import deltas_
from splice.merge.registry import merge_method


def elect_sign(deltas: Sequence[Tensor]) -> Tensor:
    """γ = +1 where Σ_t τ_t > 0, −1 elsewhere (float, shape of the inputs)."""
    total = deltas[0].clone()
    for d in deltas[1:]:
        total.add_(d)
    return total.gt_(0).mul_(2).sub_(1)


def agree_masks(deltas: Sequence[Tensor], sign: Tensor) -> list[Tensor]:
    """M_t = [τ_t ⊙ γ > 0] (bool)."""
    return [(d * sign) > 0 for d in deltas]


def unified_vector(deltas: Sequence[Tensor], sign: Tensor, masks: Sequence[Tensor]) -> Tensor:
    """τ_uni = γ ⊙ max_t |M_t ⊙ τ_t| (a new tensor)."""
    top = torch.zeros_like(sign)
    for d, m in zip(deltas, masks, strict=True):
        torch.maximum(top, d.abs().mul_(m), out=top)
    return top.mul_(sign)


@merge_method("emr", needs_base=True)
def emr(base: Tensor, tensors: Sequence[Tensor]) -> Tensor:
    """EMR's unified model base + τ_uni (per-task models: `splice compress emr`)."""
    if not tensors:
        return base
    deltas = deltas_(base, tensors)
    sign = elect_sign(deltas)
    return base.add_(unified_vector(deltas, sign, agree_masks(deltas, sign)))
