"""Model Stock (Jang et al. 2024, "Model Stock: All we need is just a few fine-tuned
models").

With task vectors δ_i = θ_i − base (N >= 2 of them):

    cos θ = mean over pairs i < j of (δ_i · δ_j) / max(|δ_i| |δ_j|, 1e-6), each clamped
            to [−1, 1]
    t     = N cos θ / (1 + (N − 1) cos θ)
    merged = t · mean_i(θ_i) + (1 − t) · base  =  base + t · mean_i(δ_i)

When |1 + (N − 1) cos θ| < 1e-6 there is no finite estimate and the base is kept (t = 0),
as in mergekit.

Choices:
- ``scope="tensor"`` (default in both dialects): one t per tensor, from the flattened
  task vectors. ``scope="row"``: one t per vector along the last axis (the rows of a 2-D
  weight; a 1-D tensor is one row), mergekit's ``filter_wise: true``.
- ``filter_wise`` is accepted under mergekit's name; when given (true/false) it decides
  and ``scope`` is ignored.
- mergekit dialect in float16 / bfloat16: mergekit's form t · mean_i(θ_i) + (1 − t) · base,
  in that dtype (the two forms round differently); float32 and the splice dialect use
  base + t · mean_i(δ_i).
- Needs the base plus at least 2 models (mergekit: at least 3 inputs including the base).
"""

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from splice.merge.methods._common import deltas_
from splice.merge.methods._mergekit_precision import (
    mergekit_arithmetic,
    model_stock_in_dtype,
)
from splice.merge.registry import MergeContext, merge_method
from splice.merge.sparsify import rows_view


def model_stock_ratio(deltas: Sequence[Tensor]) -> Tensor:
    """t for each row of the 2-D task vectors ``deltas`` (shape [rows, 1])."""
    norms = [torch.linalg.vector_norm(d, dim=-1) for d in deltas]
    cosines = []
    for i in range(len(deltas)):
        for j in range(i + 1, len(deltas)):
            dot = (deltas[i] * deltas[j]).sum(dim=-1)
            cosines.append((dot / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    n = len(deltas)
    denominator = 1 + (n - 1) * cos
    singular = denominator.abs() < 1e-6
    ratio = n * cos / torch.where(singular, torch.ones_like(denominator), denominator)
    return ratio.masked_fill_(singular, 0.0)


@merge_method("model_stock", needs_base=True, min_models=2)
def model_stock(
    base: Tensor,
    tensors: Sequence[Tensor],
    *,
    scope: Literal["tensor", "row"] = "tensor",
    filter_wise: bool | None = None,
    ctx: MergeContext,
) -> Tensor:
    """Move from the base towards the average by the ratio t from the task-vector angle."""
    if filter_wise is not None:
        scope = "row" if filter_wise else "tensor"
    if mergekit_arithmetic(ctx, base.dtype):
        return model_stock_in_dtype(base, tensors, filter_wise=scope == "row")
    deltas = deltas_(base, tensors)
    rows = [rows_view(d) if scope == "row" else d.reshape(1, -1) for d in deltas]
    ratio = model_stock_ratio(rows)
    mean = rows[0]
    for r in rows[1:]:
        mean.add_(r)
    mean.div_(len(rows)).mul_(ratio)
    return base.add_(mean.reshape(base.shape))
