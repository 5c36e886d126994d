"""LoRA-LEGO (Zhao et al. 2024/ICLR 2025, "Merging LoRAs like Playing LEGO"): rank-wise clustering.

Every rank-1 pair of every LoRA is a Minimal Semantic Unit (MSU) u = (b, a) with
ΔW_i = Σ_j w_i s_i b_ij a_ijᵀ. The weight and scale are split evenly onto both halves:

    g = √|w_i s_i|,   b = g · B_i[:, j],   a = sign(w_i s_i) · g · A_i[j, :]

so that b aᵀ is the MSU's exact contribution. Then:
1. cluster the MSU vectors x = [a; b] (all adapters pooled) into k clusters with k-means
   (`splice.lora_merge.kmeans`: k-means++ seeding from `ctx.generator(0)`, i.e. from the merge
   seed and the module name, then Lloyd to convergence) — deterministic;
2. each cluster's centroid (a_c, b_c) = the mean of its members;
3. parameter reweighting against norm decay (the paper's rescaling: averaging vectors that
   point in different directions shrinks them): each half of the centroid is rescaled to the
   mean norm of that half over the members, a_c ← a_c · mean‖a_m‖ / ‖a_c‖ (same for b);
4. merged LoRA: B = [b_1 … b_k], A = [a_1; …; a_k], scale λ.
k = --rank, default max r_i (capped at the number of MSUs). Not done: the paper's second,
output-side reweighting (variance expansion); use `lambda` to rescale the merged output.
MSUs are not sign-canonicalized: (b, a) and (−b, −a) are the same unit but lie far apart.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from splice.delta import LowRank
from splice.lora_merge.kmeans import kmeans
from splice.lora_merge.methods._common import Rank, default_rank
from splice.merge.registry import MergeContext, PerModel, merge_method


def msus(loras: Sequence[LowRank], weights: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """(A-halves: N×in, B-halves: N×out) of all MSUs, weight and scale split evenly."""
    a_rows, b_rows = [], []
    for f, w in zip(loras, weights, strict=True):
        c = w * f.scaling
        g = math.sqrt(abs(c))
        a_rows.append(f.a.double() * (g * (1.0 if c >= 0 else -1.0)))
        b_rows.append(f.b.double().T * g)
    return torch.cat(a_rows), torch.cat(b_rows)


def _rescale(centre: torch.Tensor, members: torch.Tensor) -> torch.Tensor:
    norm = float(centre.norm())
    target = float(members.norm(dim=1).mean())
    return centre * (target / norm) if norm > 0 else centre


@merge_method("lego", needs_base=False, random=True, representation="low_rank")
def lego(
    base: None,
    tensors: Sequence[LowRank],
    *,
    weight: PerModel[float] = 1.0,
    rank: Rank | None = None,
    lambda_: float = 1.0,
    ctx: MergeContext,
) -> LowRank:
    """Cluster rank-1 units (k-means on [a; b]), average each cluster, rescale norms."""
    loras = list(tensors)
    a, b = msus(loras, weight)
    k = min(default_rank(loras, rank), a.shape[0])
    labels, _ = kmeans(torch.cat([a, b], dim=1), k, ctx.generator(0))
    out_a, out_b = [], []
    for j in range(k):
        sel = labels == j
        out_a.append(_rescale(a[sel].mean(0), a[sel]))
        out_b.append(_rescale(b[sel].mean(0), b[sel]))
    dtype = torch.float64 if loras[0].a.dtype == torch.float64 else torch.float32
    merged_b = (torch.stack(out_b, dim=1) * lambda_).to(dtype)
    return LowRank(merged_b, torch.stack(out_a).to(dtype), 1.0)
