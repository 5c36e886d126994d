"""Iso-CTS (Marczak et al. 2025, "No Task Left Behind: Isotropic Model Merging with Common
and Task-Specific Subspaces"; reference code danielm1405/iso-merging, ``iso_cts``).

For each 2-D tensor (r = min(m, n)), task vectors δ_t = θ_t − base, T tasks:

    c0 = ⌊r · common_space_fraction⌋
    s  = round((r − c0) / T)          dims per task (Python round, as the reference)
    c  = r − T · s                    common dims (so the task-specific part splits evenly)
    Σ_t δ_t = U Σ Vᵀ;  common: U_c = U[:, :c], Σ_c, V_cᵀ
    per task: δ_t' = δ_t − U_c U_cᵀ δ_t = U_t' Σ_t' V_t'ᵀ,  keep the top s triplets
    U_all = [U_1'…U_T' | U_c],  Vᵀ_all = [V_1'ᵀ; …; V_T'ᵀ; V_cᵀ],  S_all likewise
    U⊥ = polar(U_all), V⊥ᵀ = polar(Vᵀ_all)          (P Qᵀ of the thin SVD)
    merged = base + α · U⊥ (mean(S_all) I) V⊥ᵀ

Other tensors (1-D biases and norms, >2-D): base + α · mean_t δ_t, as the reference code.

Choices:
- ``common_space_fraction`` defaults to 0.8 and α ("lambda") to 1.0 (the reference config
  and FusionBench's defaults).
- When T · round((r − c0)/T) > r (possible only for small fractions and r < T·(…)), the
  reference would get a negative c; splice then uses s = ⌊(r − c0)/T⌋.
- No per-model weights (the paper has none).
"""

from collections.abc import Sequence
from typing import Annotated

import torch
from pydantic import Field
from torch import Tensor

from splice.merge.methods._common import deltas_
from splice.merge.methods._subspace import is_matrix, mean_, polar, top_triplets
from splice.merge.registry import merge_method


def split_dims(r: int, tasks: int, common_space_fraction: float) -> tuple[int, int]:
    """(common dims c, dims per task s) with c + tasks · s == r."""
    c0 = int(r * common_space_fraction)
    per_task = round((r - c0) / tasks)
    if tasks * per_task > r:
        per_task = (r - c0) // tasks
    return r - tasks * per_task, per_task


def iso_cts_matrix(deltas: Sequence[Tensor], common_space_fraction: float) -> Tensor:
    """The Iso-CTS merged task vector of 2-D task vectors (without α)."""
    r = min(deltas[0].shape)
    c, per_task = split_dims(r, len(deltas), common_space_fraction)
    total = torch.stack(list(deltas)).sum(0)
    u, s, vh = torch.linalg.svd(total, full_matrices=False)
    u_c, s_c, vh_c = u[:, :c], s[:c], vh[:c]
    specific = (d - u_c @ (u_c.T @ d) for d in deltas) if per_task > 0 else ()
    us, ss, vhs = top_triplets(specific, per_task)
    u_all = polar(torch.cat([*us, u_c], dim=1))
    vh_all = polar(torch.cat([*vhs, vh_c], dim=0))
    sigma = torch.cat([*ss, s_c]).mean()
    return (u_all @ vh_all).mul_(sigma)


@merge_method("iso_cts", needs_base=True)
def iso_cts(
    base: Tensor,
    tensors: Sequence[Tensor],
    *,
    lambda_: float = 1.0,
    common_space_fraction: Annotated[float, Field(ge=0, le=1)] = 0.8,
) -> Tensor:
    """Isotropic merge in common plus task-specific subspaces."""
    deltas = deltas_(base, tensors)
    merged = iso_cts_matrix(deltas, common_space_fraction) if is_matrix(base) else mean_(deltas)
    return base.add_(merged, alpha=lambda_)
