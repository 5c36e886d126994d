"""TSV-Merge (Gargiulo et al. 2025, "Task Singular Vectors: Reducing Task Interference in
Model Merging"; reference code AntoAndGar/task_singular_vectors,
``compute_and_sum_svd_mem_reduction``).

For each 2-D tensor (m × n, r = min(m, n)) with task vectors δ_t = θ_t − base, T tasks:

    δ_t = U_t Σ_t V_tᵀ                      thin SVD
    k   = ⌊r · f⌋ (f = sv_reduction, default 1/T)   top-k singular triplets per task
    U   = [U_1[:, :k] … U_T[:, :k]]   (m × Tk)    S = [Σ_1[:k] … Σ_T[:k]]
    Vᵀ  = [V_1ᵀ[:k]; … ; V_Tᵀ[:k]]    (Tk × n)
    U⊥  = P_U Q_Uᵀ  from U = P_U Σ Q_Uᵀ   (orthogonal polar factor, as the reference code)
    V⊥ᵀ = P_V Q_Vᵀ  from Vᵀ = P_V Σ Q_Vᵀ
    merged = base + α · U⊥ diag(S) V⊥ᵀ

Other tensors (1-D biases and norms, >2-D): base + α · mean_t δ_t, as the reference code
(it averages non-matrix task vectors and the scaling coefficient α multiplies the whole
merged task vector).

Choices:
- α ("lambda" here, as in task arithmetic) defaults to 1.0, the paper's setting for TSV-M.
- The reference zero-pads the concatenation to r columns; with T·k <= r that is the same
  matrix up to zero columns, which change neither P Qᵀ on the kept block nor the product.
  ``sv_reduction`` > 1/T (T·k > r) is allowed and uses the T·k columns as they are.
- k >= 1: for r < T the reference gets k = 0 and drops the tensor's update entirely;
  splice keeps at least the top singular triplet of each task.
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


def tsv_merge_matrix(deltas: Sequence[Tensor], sv_reduction: float | None = None) -> Tensor:
    """The TSV-M merged task vector of 2-D task vectors (without α)."""
    r = min(deltas[0].shape)
    k = max(1, int(r * (sv_reduction if sv_reduction is not None else 1 / len(deltas))))
    k = min(k, r)
    us, ss, vhs = top_triplets(deltas, k)
    u_orth = polar(torch.cat(us, dim=1))
    vh_orth = polar(torch.cat(vhs, dim=0))
    return (u_orth * torch.cat(ss)) @ vh_orth


@merge_method("tsv", needs_base=True)
def tsv(
    base: Tensor,
    tensors: Sequence[Tensor],
    *,
    lambda_: float = 1.0,
    sv_reduction: Annotated[float, Field(gt=0, le=1)] | None = None,
) -> Tensor:
    """Task Singular Vectors merge: per-task top singular vectors, orthogonalized."""
    deltas = deltas_(base, tensors)
    merged = tsv_merge_matrix(deltas, sv_reduction) if is_matrix(base) else mean_(deltas)
    return base.add_(merged, alpha=lambda_)
