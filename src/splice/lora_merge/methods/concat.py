"""`concat`: the exact sum of weighted LoRAs as one LoRA of rank Σ r_i.

    ΔW = Σ_i w_i s_i B_i A_i = [w_1 s_1 B_1 | … | w_n s_n B_n] · [A_1; …; A_n]

so B = the weighted, scaled B_i side by side, A = the A_i stacked, scale 1 (written with
lora_alpha = r). Exact: no approximation, rank Σ r_i. PEFT's `add_weighted_adapter(...,
combination_type="cat")` puts w_i s_i on A_i instead of B_i; the product is the same.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from splice.delta import LowRank
from splice.merge.registry import PerModel, merge_method


def concat_factors(loras: Sequence[LowRank], weights: Sequence[float]) -> LowRank:
    """[w_1 s_1 B_1 | …] and [A_1; …] (the exact weighted sum in factor form)."""
    b = torch.cat([f.b * (w * f.scaling) for f, w in zip(loras, weights, strict=True)], dim=1)
    a = torch.cat([f.a for f in loras], dim=0)
    return LowRank(b, a, 1.0)


@merge_method("concat", needs_base=False, representation="low_rank")
def concat(
    base: None,
    tensors: Sequence[LowRank],
    *,
    weight: PerModel[float] = 1.0,
    lambda_: float = 1.0,
) -> LowRank:
    """Exact: stack the weighted factors into one LoRA of rank Σ r_i."""
    merged = concat_factors(list(tensors), weight)
    return LowRank(merged.b * lambda_, merged.a, 1.0)
