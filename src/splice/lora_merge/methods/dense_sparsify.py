"""`ties`, `dare`, `dare_ties`: sparsifying merges on the dense ΔW_i, then back to rank r.

    ΔW_i = s_i B_i A_i                        formed for this one module only (streaming)
    ΔW   = M(0, [ΔW_1 … ΔW_n]; w, density)    M = splice's registered merge method
    (B, A) = truncated SVD of ΔW to rank r    (S into B), r defaults to max r_i

M is `splice.merge.get_method(...)` with base 0 (so the task vectors are the ΔW_i):
- `ties`: TIES (trim each ΔW_i to its top `density` fraction by magnitude, elect a sign per
  entry, disjoint mean); density defaults to 1 (sign election only).
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

import torch

from splice.delta import LowRank
from splice.delta.low_rank import truncate_dense
from splice.lora_merge.registry import LoraMergeOptions, default_rank, lora_merge_method
from splice.merge.registry import MergeContext, get_method


def merge_dense(
    method: str,
    loras: list[LowRank],
    weights: list[float],
    opts: LoraMergeOptions,
    ctx: MergeContext,
) -> torch.Tensor:
    """The merged dense ΔW of one module with splice's registered `method` (base = 0)."""
    deltas = [f.to_dense() for f in loras]
    params: dict[str, object] = {"weight": list(weights), "lambda": opts.lambda_}
    if opts.density is not None:
        params["density"] = opts.density
    if method == "ties":
        params["scope"] = "tensor"
    return get_method(method)(torch.zeros_like(deltas[0]), deltas, ctx=ctx, **params)


def _refactor(delta: torch.Tensor, loras: list[LowRank], opts: LoraMergeOptions) -> LowRank:
    b, a = truncate_dense(delta, default_rank(loras, opts))
    return LowRank(b, a, 1.0)


@lora_merge_method("ties", uses_rank=True, uses_density=True, dense=True)
def ties(
    loras: list[LowRank], weights: list[float], opts: LoraMergeOptions, ctx: MergeContext
) -> LowRank:
    """TIES on the dense ΔW_i (one module at a time), then truncated SVD to rank r."""
    return _refactor(merge_dense("ties", loras, weights, opts, ctx), loras, opts)


@lora_merge_method("dare", uses_rank=True, uses_density=True, needs_density=True, dense=True)
def dare(
    loras: list[LowRank], weights: list[float], opts: LoraMergeOptions, ctx: MergeContext
) -> LowRank:
    """DARE + task arithmetic on the dense ΔW_i, then truncated SVD to rank r."""
    return _refactor(merge_dense("dare_linear", loras, weights, opts, ctx), loras, opts)


@lora_merge_method("dare_ties", uses_rank=True, uses_density=True, needs_density=True, dense=True)
def dare_ties(
    loras: list[LowRank], weights: list[float], opts: LoraMergeOptions, ctx: MergeContext
) -> LowRank:
    """DARE + TIES on the dense ΔW_i, then truncated SVD to rank r."""
    return _refactor(merge_dense("dare_ties", loras, weights, opts, ctx), loras, opts)
