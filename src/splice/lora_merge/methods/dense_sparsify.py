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

from splice.delta import LowRank
from splice.delta.low_rank import truncate_dense
from splice.lora_merge.methods._common import (
    REQUIRED,
    SparsifyParams,
    default_rank,
    merge_dense,
    sparsifying_method,
)
from splice.merge.registry import MergeContext


def _sparsify_refactor(
    dense: str, loras: Sequence[LowRank], p: SparsifyParams, ctx: MergeContext
) -> LowRank:
    """Dense ΔW_i of this module, the dense method, truncated SVD to rank r (S into B)."""
    delta = merge_dense(dense, [f.to_dense() for f in loras], p, ctx)
    b, a = truncate_dense(delta, default_rank(list(loras), p.rank))
    return LowRank(b, a, 1.0)


ties = sparsifying_method(
    "ties",
    "ties",
    _sparsify_refactor,
    "TIES on the dense ΔW_i (one module at a time), then truncated SVD to rank r.",
    density_default=1.0,
    random=False,
)
dare = sparsifying_method(
    "dare",
    "dare_linear",
    _sparsify_refactor,
    "DARE + task arithmetic on the dense ΔW_i, then truncated SVD to rank r.",
    density_default=REQUIRED,
    random=True,
)
dare_ties = sparsifying_method(
    "dare_ties",
    "dare_ties",
    _sparsify_refactor,
    "DARE + TIES on the dense ΔW_i, then truncated SVD to rank r.",
    density_default=REQUIRED,
    random=True,
)
