"""PCB-merging (Du et al. 2024, "Parameter Competition Balancing for Model Merging").

Following the official ``PCB_merge`` (``duguodong7/pcb-merging``, ``pcb-merging.py``)
step by step, for N task vectors τ_i = θ_i − base, each of d entries:

    a_i     = clip(|τ_i|, q_i(1e-4), q_i(1 − 1e-4))     outlier clipping of magnitudes
    τ̃_i     = sign(τ_i) ⊙ a_i                            the clipped task vectors
    intra_i = exp(N · norm(a_i)²)                        intra-balancing
    inter_i = tanh(τ_i ⊙ Σ_j τ_j)                        inter-balancing (j runs over all
                                                          tasks, i included; unclipped τ)
    β_i     = intra_i ⊙ inter_i                           the balancing matrix
    s_i     = norm(max(β_i, q_i'(1 − r)))                drop: entries below the quantile
                                                          all become 0, the kept top ~r
                                                          fraction is rescaled into (0, 1]
    merged  = base + λ · Σ_i s_i ⊙ τ̃_i / max(Σ_i s_i, 1e-12)

with norm(x) = (x − min x) / (max x − min x) over one task's entries, and the order
statistics taken as the official code does, from the ascending sort of one task's d
values: q(lo) = sorted[int(d · lo)] for the lower clip, q(1 − hi) = sorted[int(d · (1 −
hi) − 1)] for the upper clip (so q_i(1 − 1e-4) is the second largest value once d < 10^4),
and q'(1 − r) = sorted[int(d · (1 − r))].

Choices, written down:
- The paper's softmax over the entries is the code's ``exp`` without the denominator; the
  per-task denominator cancels in the min-max ``norm`` of the last step (positive scaling),
  so both give the same result; we compute ``exp``.
- Temperature: intra-balancing uses N (number of models) as in the code; inter-balancing
  is ``tanh`` with no temperature (the paper's softmax form is not what the code does).
- Scope: the official code flattens the whole model into one vector per task; here the
  statistics (quantiles, min/max) are taken per tensor. The masks and weights therefore
  differ from the official run on a whole model (tensor-level is what a streaming merge
  can do without whole-model order statistics).
- A constant row (max = min) normalizes to 0 instead of the official 0/0 = NaN; if no
  entry of any task survives, the merged delta there is 0.
- ``ratio`` defaults to 0.1 (the official function's default; its example script uses
  0.05); λ defaults to 1.0 (the official evolutionary search starts from 1.0).
"""

from collections.abc import Sequence
from typing import Annotated

import torch
from pydantic import Field
from torch import Tensor

from splice.merge.methods._common import add_scaled_, deltas_
from splice.merge.registry import merge_method

CLIP = 1e-4  # the official min_ratio / max_ratio of the magnitude clipping


def minmax_rows(x: Tensor) -> Tensor:
    """(x − min) / (max − min) per row of a 2-D tensor, in place; a constant row gives 0."""
    lo = x.min(dim=1, keepdim=True).values
    span = x.max(dim=1, keepdim=True).values.sub_(lo)
    x.sub_(lo)
    return x.div_(span.masked_fill_(span == 0, 1))


def kth_sorted_rows(x: Tensor, index: int) -> Tensor:
    """``sort(x, dim=1).values[:, index]`` (as a column), by selection."""
    return torch.kthvalue(x, index + 1, dim=1, keepdim=True).values


def pcb_weights(deltas: Tensor, ratio: float) -> tuple[Tensor, Tensor]:
    """The clipped task vectors τ̃ and the balancing scores s, both (N, d), for the stacked
    flat task vectors ``deltas`` (N, d)."""
    n, d = deltas.shape
    mag = deltas.abs()
    mag = mag.clamp_(
        kth_sorted_rows(mag, int(d * CLIP)), kth_sorted_rows(mag, int(d * (1 - CLIP) - 1))
    )
    clipped = deltas.sign().mul_(mag)
    intra = minmax_rows(mag).pow_(2).mul_(n).exp_()
    inter = deltas.mul(deltas.sum(dim=0)).tanh_()
    score = intra.mul_(inter)
    del inter
    score = torch.maximum(score, kth_sorted_rows(score, int(d * (1 - ratio))))
    return clipped, minmax_rows(score)


@merge_method("pcb", needs_base=True)
def pcb(
    base: Tensor,
    tensors: Sequence[Tensor],
    *,
    ratio: Annotated[float, Field(gt=0, le=1)] = 0.1,
    lambda_: float = 1.0,
) -> Tensor:
    """Weight each task-vector entry by intra- and inter-task balancing, keep the top r."""
    if not tensors or base.numel() == 0:
        return base
    deltas = torch.stack([d.reshape(-1) for d in deltas_(base, tensors)])
    clipped, score = pcb_weights(deltas, ratio)
    del deltas
    merged = clipped.mul_(score).sum(dim=0).div_(score.sum(dim=0).clamp_(min=1e-12))
    return add_scaled_(base, merged.reshape(base.shape), lambda_)
