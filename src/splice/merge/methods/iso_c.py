"""Iso-C (Marczak et al. 2025, "No Task Left Behind: Isotropic Model Merging with Common
and Task-Specific Subspaces"; reference code danielm1405/iso-merging, ``iso_c``).

For each 2-D tensor, with task vectors δ_t = θ_t − base:

    Δ = Σ_t δ_t = U Σ Vᵀ                   (thin SVD)
    merged = base + α · U (σ̄ I) Vᵀ,   σ̄ = mean(diag Σ)

i.e. the spectrum of the summed task vector is flattened to its mean (isotropic).
Other tensors (1-D biases and norms, >2-D): base + α · mean_t δ_t, as the reference code.

Choices: α ("lambda") defaults to 1.0 (FusionBench's ``scaling_factor`` default; the
paper tunes it on validation data). No per-model weights (the paper has none).
"""

from collections.abc import Sequence

import torch
from torch import Tensor

from splice.merge.methods._common import deltas_
from splice.merge.methods._subspace import is_matrix, mean_, sum_
from splice.merge.registry import merge_method


def isotropic(matrix: Tensor) -> Tensor:
    """U (mean σ) Vᵀ: ``matrix`` with every singular value replaced by their mean."""
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return (u @ vh).mul_(s.mean())


@merge_method("iso_c", needs_base=True)
def iso_c(base: Tensor, tensors: Sequence[Tensor], *, lambda_: float = 1.0) -> Tensor:
    """Isotropic merge in the common subspace: sum of task vectors, flat spectrum."""
    deltas = deltas_(base, tensors)
    merged = isotropic(sum_(deltas)) if is_matrix(base) else mean_(deltas)
    return base.add_(merged, alpha=lambda_)
