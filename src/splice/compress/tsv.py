"""TSV-Compress (Gargiulo et al. 2025, "Task Singular Vectors: Reducing Task Interference in
Model Merging", section on TSV-C; reference code AntoAndGar/task_singular_vectors): store
each task's update to a matrix as its top singular triplets.

For a 2-D task vector δ (m × n, r = min(m, n)) and k kept components:

    δ = U Σ Vᵀ (thin SVD)  ->  LowRank(U[:, :k] diag(Σ[:k]), Vᵀ[:k])   (k (m + n) numbers)
    δ̂ = U[:, :k] diag(Σ[:k]) Vᵀ[:k]                                  (the best rank-k
                                                                      approximation, Eckart–Young)

For T tasks the paper keeps k = ⌊r / T⌋ per task (``fraction`` = 1/T), so all tasks together
take about the storage of one dense model; a task's model is restored as base + δ̂_t.
Other tensors (1-D biases and norms, >2-D) have no singular structure and are kept dense,
as in the reference code. k is at least 1 and at most r.

Pure functions; no CLI (files are the caller's business).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from splice.delta import Dense, LowRank
from splice.errors import MergeValidationError


def kept_rank(shape: Sequence[int], *, rank: int | None, fraction: float | None) -> int:
    """k from an explicit ``rank`` or a ``fraction`` of r = min(m, n) (⌊r·f⌋), clamped to
    [1, r]. Exactly one of the two must be given."""
    if (rank is None) == (fraction is None):
        raise MergeValidationError("TSV-C: give exactly one of rank and fraction")
    r = min(shape)
    if rank is not None:
        if rank < 1:
            raise MergeValidationError(f"TSV-C: rank = {rank} is invalid: it must be >= 1")
        return min(rank, r)
    assert fraction is not None
    if not 0 < fraction <= 1:
        raise MergeValidationError(f"TSV-C: fraction = {fraction} is invalid: it must be in (0, 1]")
    return min(r, max(1, int(r * fraction)))


def compress_delta(
    delta: Tensor, *, rank: int | None = None, fraction: float | None = None
) -> LowRank | Dense:
    """One task vector: its top-k singular triplets (2-D), as ``LowRank(U_k diag(S_k),
    V_kᵀ)``, or itself (anything else)."""
    if delta.ndim != 2:
        return Dense(delta)
    k = kept_rank(delta.shape, rank=rank, fraction=fraction)
    u, s, vh = torch.linalg.svd(delta.to(torch.float32), full_matrices=False)
    return LowRank((u[:, :k] * s[:k]).contiguous(), vh[:k].contiguous())


def compress_tasks(
    base: Mapping[str, Tensor],
    models: Sequence[Mapping[str, Tensor]],
    *,
    fraction: float | None = None,
) -> list[dict[str, LowRank | Dense]]:
    """TSV-C of T fine-tuned state dicts against ``base``: per task and tensor, the factors
    of δ_t = θ_t − base with k = ⌊r · fraction⌋ (fraction defaults to 1/T, the paper's)."""
    if not models:
        raise MergeValidationError("TSV-C needs at least one fine-tuned model")
    f = fraction if fraction is not None else 1 / len(models)
    out = []
    for i, model in enumerate(models):
        missing = set(base) ^ set(model)
        if missing:
            raise MergeValidationError(
                f"TSV-C: model {i} does not have the base's tensors ('{sorted(missing)[0]}')"
            )
        out.append(
            {n: compress_delta(model[n].float() - base[n].float(), fraction=f) for n in base}
        )
    return out


def restore_task(
    base: Mapping[str, Tensor], compressed: Mapping[str, LowRank | Dense]
) -> dict[str, Tensor]:
    """θ̂_t = base + δ̂_t, in each base tensor's dtype."""
    return {n: (b.float() + compressed[n].to_dense()).to(b.dtype) for n, b in base.items()}
