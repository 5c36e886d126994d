"""EMR-Merging as compression (Huang et al. 2024, "EMR-Merging: Tuning-Free
High-Performance Model Merging"; official code ``harveyhuang18/EMR_Merging``).

Store the unified task vector τ_uni once, one bit per entry per task (M_t) and one float
per task (λ_t); restore θ̂_t = base + λ_t · M_t ⊙ τ_uni. The math is in
`splice.merge.methods.emr`. The rescalers are whole-model, as in the official
``emr_merge``: λ_t = Σ_n mean|τ_t,n| / Σ_n mean|M_t,n ⊙ τ_uni,n|, the sums over all float
tensors n; each tensor's two means are its share of that whole-model statistic, summed in
tensor order by the streaming pass. A task whose masked unified vector is zero everywhere
gets λ_t = 1 (0/0 in the official code).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from splice.compress.registry import compression_method
from splice.merge.methods.emr import agree_masks, elect_sign, unified_vector


class EmrKernel:
    """Per tensor: (τ_uni, M_t, its share (mean|τ_t,n|, mean|M_t,n ⊙ τ_uni,n|) per task t)."""

    def __call__(
        self, base: Tensor, deltas: list[Tensor]
    ) -> tuple[Tensor, list[Tensor], list[tuple[float, float]]]:
        sign = elect_sign(deltas)
        masks = agree_masks(deltas, sign)
        uni = unified_vector(deltas, sign, masks)
        if not uni.numel():
            return uni, masks, [(0.0, 0.0)] * len(deltas)
        share = [
            (float(d.abs().mean()), float(uni.abs().mul_(m).mean()))
            for d, m in zip(deltas, masks, strict=True)
        ]
        return uni, masks, share

    def scales(self, shares: list[Sequence[tuple[float, float]]]) -> list[float]:
        """λ_t = Σ_n before / Σ_n after, summed in tensor order."""
        n_tasks = len(shares[0]) if shares else 0
        before, after = [0.0] * n_tasks, [0.0] * n_tasks
        for share in shares:
            for t, (b, a) in enumerate(share):
                before[t] += b
                after[t] += a
        return [b / a if a > 0 else 1.0 for b, a in zip(before, after, strict=True)]


@compression_method("emr")
def emr() -> EmrKernel:
    """EMR-Merging: unified vector, masks and rescalers."""
    return EmrKernel()
