"""EMR-Merging as compression (Huang et al. 2024, "EMR-Merging: Tuning-Free
High-Performance Model Merging"; official code ``harveyhuang18/EMR_Merging``).

Store the unified task vector τ_uni once, one bit per entry per task (M_t) and one float
per task (λ_t); restore θ̂_t = base + λ_t · M_t ⊙ τ_uni. The math is in
`splice.merge.methods.emr`. The rescalers are whole-model, as in the official
``emr_merge``: λ_t = Σ_n mean|τ_t,n| / Σ_n mean|M_t,n ⊙ τ_uni,n|, the sums over all float
tensors n; the kernel accumulates both sums while the tensors stream by. A task whose
masked unified vector is zero everywhere gets λ_t = 1 (0/0 in the official code).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from torch import Tensor

from splice.compress.stream import DEFAULT_SHARD_BYTES, CompressReport, compress
from splice.merge.methods.emr import agree_masks, elect_sign, unified_vector


class EmrKernel:
    """Per tensor: (τ_uni, M_t); accumulates the whole-model rescaler sums."""

    def __init__(self, n_tasks: int) -> None:
        self.before = [0.0] * n_tasks  # Σ_n mean|τ_t,n|
        self.after = [0.0] * n_tasks  # Σ_n mean|M_t,n ⊙ τ_uni,n|

    def __call__(self, base: Tensor, deltas: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        sign = elect_sign(deltas)
        masks = agree_masks(deltas, sign)
        uni = unified_vector(deltas, sign, masks)
        if uni.numel():
            for t, (d, m) in enumerate(zip(deltas, masks, strict=True)):
                self.before[t] += float(d.abs().mean())
                self.after[t] += float(uni.abs().mul_(m).mean())
        return uni, masks

    def scales(self) -> list[float]:
        return [b / a if a > 0 else 1.0 for b, a in zip(self.before, self.after, strict=True)]


def compress_emr(
    base: str,
    models: Sequence[str],
    out_dir: str | Path,
    *,
    names: Sequence[str] | None = None,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    overwrite: int | bool = False,
    allow_nonfinite: bool = False,
) -> CompressReport:
    """Compress fine-tuned ``models`` of ``base`` into τ_uni, per-task masks and rescalers."""
    return compress(
        base,
        models,
        out_dir,
        EmrKernel(len(models)),
        method="emr",
        params={},
        names=names,
        shard_bytes=shard_bytes,
        overwrite=overwrite,
        allow_nonfinite=allow_nonfinite,
    )
