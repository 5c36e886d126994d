"""`svd`: the weighted sum of LoRAs reduced to rank r, never forming the out×in matrix.

    ΔW = Σ_i w_i s_i B_i A_i = B_cat A_cat                  (see `concat`)
    B_cat = Q_B R_B,  A_catᵀ = Q_A R_A,  R_B R_Aᵀ = U S Vᵀ  (QR twice, SVD of an R×R core)
    ΔW_r = (Q_B U_r S_r) (Q_A V_r)ᵀ                          the truncated SVD of ΔW

By Eckart–Young this is the best rank-r approximation of the dense sum (the golden test
checks it against `torch.linalg.svd` of the dense ΔW). rank defaults to max r_i, as PEFT's
`combination_type="svd"`; like PEFT, S goes into B. PEFT forms the dense ΔW and takes a full
SVD (optionally clamping entries at a quantile, `svd_clamp`, not done here).
"""

from __future__ import annotations

from collections.abc import Sequence

from splice.delta import LowRank
from splice.delta.low_rank import truncate_factors
from splice.lora_merge.methods._common import Rank, default_rank
from splice.lora_merge.methods.concat import concat_factors
from splice.merge.registry import PerModel, merge_method


@merge_method("svd", needs_base=False, representation="low_rank")
def svd(
    base: None,
    tensors: Sequence[LowRank],
    *,
    weight: PerModel[float] = 1.0,
    rank: Rank | None = None,
    lambda_: float = 1.0,
) -> LowRank:
    """Weighted sum truncated to rank r via QR + SVD of the small core (no dense ΔW)."""
    loras = list(tensors)
    cat = concat_factors(loras, weight)
    b, a = truncate_factors(cat.b, cat.a, default_rank(loras, rank))
    return LowRank(b * lambda_, a, 1.0)
