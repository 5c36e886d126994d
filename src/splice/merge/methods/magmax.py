"""MagMax (Marczak et al. 2024, "MagMax: Leveraging Model Merging for Seamless Continual
Learning").

    τ_i    = θ_i − base
    j(e)   = argmax_i |τ_i[e]|            per entry e; equal magnitudes: the LAST model wins
    merged = base + λ · τ_{j(e)}[e]

Reference: the official code (``danielm1405/magmax``, ``merge_max_abs``) walks the task
vectors in order and replaces the running choice where ``|current| >= |chosen|``, so among
equal magnitudes the last model wins; we do the same. It applies the result with
``scaling_coef=0.5`` in its merging scripts, hence the default λ = 0.5 here. The choice is
per entry, so merging tensor by tensor is exact.
"""

from collections.abc import Sequence

import torch
from torch import Tensor

from splice.merge.methods._common import deltas_
from splice.merge.registry import merge_method


def max_magnitude_(deltas: Sequence[Tensor]) -> Tensor:
    """Per entry, the task-vector value with the largest magnitude (last one on ties);
    written into ``deltas[0]``."""
    chosen = deltas[0]
    for d in deltas[1:]:
        torch.where(d.abs() >= chosen.abs(), d, chosen, out=chosen)
    return chosen


@merge_method("magmax", needs_base=True)
def magmax(
    base: Tensor,
    tensors: Sequence[Tensor],
    *,
    lambda_: float = 0.5,
) -> Tensor:
    """Per entry, keep the task-vector value of largest magnitude; scale by λ."""
    if not tensors:
        return base
    merged = max_magnitude_(deltas_(base, tensors))
    if lambda_ != 1:
        merged.mul_(lambda_)
    return base.add_(merged)
