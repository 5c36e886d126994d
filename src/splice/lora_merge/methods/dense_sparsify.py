"""`ties`, `dare`, `dare_ties`: sparsifying merges on the dense ΔW_i, then back to rank r.

    ΔW_i = s_i B_i A_i                        formed for this one module only (streaming)
    ΔW   = M(0, [ΔW_1 … ΔW_n]; w, density)    M = splice's registered merge method
    (B, A) = truncated SVD of ΔW to rank r    (S into B), r defaults to max r_i

M is `splice.merge.get_method(...)` with base 0 (so the task vectors are the ΔW_i):
- `ties`: TIES (trim each ΔW_i to its top `density` fraction by magnitude, elect a sign per
  entry, disjoint mean); density defaults to 1 (sign election only), as the dense `ties`.
- `dare`: DARE with task arithmetic (`dare_linear`: drop with prob 1 − density, rescale by
  1/density, weighted sum); density required.
- `dare_ties`: DARE drop-and-rescale, then TIES election and disjoint mean; density required.

Choices: trimming is per tensor (`scope="tensor"`, exactly round(density · n) entries kept);
a LoRA merge has no whole-model statistics pass. Random masks come from
`ctx.generator(i)` (seed, module name, adapter index). Peer: PEFT's `ties_svd`,
`dare_linear_svd`, `dare_ties_svd` do the same pipeline with its own TIES (keeps
int(density · n) entries; disjoint mean divides by the count of agreeing entries where
splice divides by the sum of their weights: the same for unit weights) and the global RNG.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from splice.delta import LowRank
from splice.delta.low_rank import truncate_dense
from splice.lora_merge.methods._common import Density, Rank, default_rank
from splice.merge.registry import MergeContext, PerModel, get_method, merge_method


def merge_dense(
    method: str,
    tensors: Sequence[torch.Tensor],
    weight: list[float],
    density: list[float] | None,
    lambda_: float,
    ctx: MergeContext,
) -> torch.Tensor:
    """Dense `method` (splice's registered one) on ``tensors`` with base 0, trimming per tensor."""
    params: dict[str, object] = {"weight": list(weight), "lambda": lambda_}
    if density is not None:
        params["density"] = list(density)
    if method == "ties":
        params["scope"] = "tensor"
    return get_method(method)(torch.zeros_like(tensors[0]), list(tensors), ctx=ctx, **params)


def _sparsify_refactor(
    method: str,
    loras: Sequence[LowRank],
    weight: list[float],
    density: list[float],
    rank: int | None,
    lambda_: float,
    ctx: MergeContext,
) -> LowRank:
    """Dense ΔW_i of this module, dense `method`, truncated SVD to rank r (S into B)."""
    delta = merge_dense(method, [f.to_dense() for f in loras], weight, density, lambda_, ctx)
    b, a = truncate_dense(delta, default_rank(list(loras), rank))
    return LowRank(b, a, 1.0)


@merge_method("ties", needs_base=False, representation="low_rank")
def ties(
    base: None,
    tensors: Sequence[LowRank],
    *,
    weight: PerModel[float] = 1.0,
    density: PerModel[Density] = 1.0,
    rank: Rank | None = None,
    lambda_: float = 1.0,
    ctx: MergeContext,
) -> LowRank:
    """TIES on the dense ΔW_i (one module at a time), then truncated SVD to rank r."""
    return _sparsify_refactor("ties", tensors, weight, density, rank, lambda_, ctx)


@merge_method("dare", needs_base=False, random=True, representation="low_rank")
def dare(
    base: None,
    tensors: Sequence[LowRank],
    *,
    weight: PerModel[float] = 1.0,
    density: PerModel[Density],
    rank: Rank | None = None,
    lambda_: float = 1.0,
    ctx: MergeContext,
) -> LowRank:
    """DARE + task arithmetic on the dense ΔW_i, then truncated SVD to rank r."""
    return _sparsify_refactor("dare_linear", tensors, weight, density, rank, lambda_, ctx)


@merge_method("dare_ties", needs_base=False, random=True, representation="low_rank")
def dare_ties(
    base: None,
    tensors: Sequence[LowRank],
    *,
    weight: PerModel[float] = 1.0,
    density: PerModel[Density],
    rank: Rank | None = None,
    lambda_: float = 1.0,
    ctx: MergeContext,
) -> LowRank:
    """DARE + TIES on the dense ΔW_i, then truncated SVD to rank r."""
    return _sparsify_refactor("dare_ties", tensors, weight, density, rank, lambda_, ctx)
