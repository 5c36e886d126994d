"""KnOTS (Stoica et al. 2025, "Model merging with SVD to tie the KnOTS"), in factor form.

    [ΔW_1 | … | ΔW_n] = U S [V_1ᵀ | … | V_nᵀ]      ΔW_i = s_i B_i A_i, joint SVD (out × n·in)
    C_i = S V_iᵀ                                    task i's coefficients in the shared basis U
    C   = M(0, [C_1 … C_n]; w, density)             TIES (`knots`) or DARE-TIES (`knots_dare`)
    ΔW  = U C                                       written as B = U, A = C (rank k)

Choices follow the official code (gstoica27/KnOTS, `task_merger.py` SVDMerger, `masking_ops.py`):
- task updates concatenated along the input dimension (`concat_across_output=True`: an
  out × n·in matrix), SVD in float64, components with σ ≤ 1e-5 dropped (absolute threshold);
- S goes onto the coefficients (`s_on_V=True`), so the merge acts on S V_iᵀ;
- merge = TIES with the disjoint *mean* (`merging_type="mean"`, sign of the sum of values);
  KnOTS-DARE drops entries of C_i with probability 1 − density and rescales by 1/density
  before the TIES step; the official config's scaling coefficient is our `lambda`.
Here the joint SVD never forms the out × n·in matrix: B_cat = [s_1 B_1 | …] = Q R, the core
R · blockdiag(A_i) is R × n·in (R = Σ r_i), and U = Q U_core. Deviation: official TIES trims
over the whole model's flattened coefficients; here per module (scope="tensor"), and
per-model weights w_i enter TIES' weighted disjoint mean (official: one global coefficient).
With --rank r the result is further truncated to rank r (default: keep all k ≤ Σ r_i).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from splice.delta import LowRank
from splice.delta.low_rank import truncate_factors
from splice.lora_merge.methods._common import (
    REQUIRED,
    SparsifyParams,
    merge_dense,
    sparsifying_method,
)
from splice.merge.registry import MergeContext

SIGMA_EPS = 1e-5


def knots_basis(loras: Sequence[LowRank]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(U: out×k, [C_i: k×in]) with [ΔW_1 | … | ΔW_n] = U [C_1 | … | C_n], C_i = S V_iᵀ."""
    dtype = torch.float64 if any(f.b.dtype == torch.float64 for f in loras) else torch.float32
    b_cat = torch.cat([f.b.double() * f.scaling for f in loras], dim=1)
    q, r = torch.linalg.qr(b_cat)
    blocks, col = [], 0
    for f in loras:
        blocks.append(r[:, col : col + f.rank] @ f.a.double())
        col += f.rank
    u, s, vh = torch.linalg.svd(torch.cat(blocks, dim=1), full_matrices=False)
    keep = s > SIGMA_EPS
    basis = (q @ u[:, keep]).to(dtype)
    coeffs = (s[keep, None] * vh[keep]).to(dtype)
    width = loras[0].shape[1]
    return basis, [c.contiguous() for c in torch.split(coeffs, width, dim=1)]


def _knots(dense: str, loras: Sequence[LowRank], p: SparsifyParams, ctx: MergeContext) -> LowRank:
    basis, coeffs = knots_basis(loras)
    if basis.shape[1] == 0:
        return LowRank(basis, coeffs[0], 1.0)
    merged = merge_dense(dense, coeffs, p, ctx)
    if p.rank is not None:
        b, a = truncate_factors(basis, merged, p.rank)
        return LowRank(b, a, 1.0)
    return LowRank(basis, merged, 1.0)


knots = sparsifying_method(
    "knots",
    "ties",
    _knots,
    "KnOTS-TIES: joint SVD basis, TIES on the per-task coefficients, reconstruct.",
    density_default=1.0,
    random=False,
)
knots_dare = sparsifying_method(
    "knots_dare",
    "dare_ties",
    _knots,
    "KnOTS-DARE: joint SVD basis, DARE + TIES on the per-task coefficients, reconstruct.",
    density_default=REQUIRED,
    random=True,
)
