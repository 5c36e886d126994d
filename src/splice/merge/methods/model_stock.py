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
- Statistics, splice dialect: the dots δ_i · δ_j (norms from δ_i · δ_i) are a Gram matrix
  in float64 (`_row_gram`): ``scope="tensor"`` adds each first-dimension row's partial sum
  in row order, so it is the same bits whole or in row chunks; a tensor too large for its
  share of ``--memory`` is merged in row chunks with the Gram of a statistics pre-pass
  (`TensorGram`, `splice.engine.chunks`). ``scope="row"`` takes each last-axis row's
  partials (one t per row, in float64), which a row chunk of a tensor of 2 or more
  dimensions holds whole: chunked without a pre-pass (a 1-D tensor is one row: not
  chunked). The cosines, their mean and t are float64, t rounded to the compute dtype
  once for ``mean(δ) · t``.
- mergekit dialect: mergekit's own reductions (torch's thread ranges over the whole tensor,
  `_mergekit_precision.model_stock_in_dtype`), which no row chunk's partial sums repeat
  bit for bit: not merged in row chunks, either scope.
"""

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from splice.merge.methods._common import deltas_
from splice.merge.methods._mergekit_precision import (
    mergekit_arithmetic,
    model_stock_in_dtype,
)
from splice.merge.methods._row_gram import row_dots, tensor_gram
from splice.merge.registry import Dialect, MergeContext, merge_method
from splice.merge.sparsify import rows_view
from splice.merge.stats import TensorGram

GRAM = TensorGram(of_delta=True)  # of the task vectors


def model_stock_ratio(gram: Tensor) -> Tensor:
    """t (float64, shape [rows, 1]) from the Gram matrices [rows, n, n] of the n task
    vectors, one per row (one for the whole tensor: [1, n, n])."""
    n = gram.shape[-1]
    norms = gram.diagonal(dim1=-2, dim2=-1).sqrt()  # [rows, n]
    cosines = []
    for i in range(n):
        for j in range(i + 1, n):
            dot = gram[:, i, j]
            cosines.append((dot / (norms[:, i] * norms[:, j]).clamp(min=1e-6)).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    denominator = 1 + (n - 1) * cos
    singular = denominator.abs() < 1e-6
    ratio = n * cos / torch.where(singular, torch.ones_like(denominator), denominator)
    return ratio.masked_fill_(singular, 0.0)


def _scope(params: Mapping[str, Any]) -> str:
    """The scope in effect: ``filter_wise``, when given, decides."""
    filter_wise = params.get("filter_wise")
    if filter_wise is not None:
        return "row" if filter_wise else "tensor"
    return params["scope"]


def model_stock_chunks(params: Mapping[str, Any], dialect: Dialect, ndim: int) -> bool:
    """``row_chunks`` of Model Stock (splice dialect): scope tensor given the task vectors'
    Gram; scope row when a first-dimension row chunk holds whole last-axis rows (2 or more
    dimensions)."""
    return dialect == "splice" and (_scope(params) == "tensor" or ndim >= 2)


@merge_method(
    "model_stock",
    needs_base=True,
    min_models=2,
    model_stats=lambda params: [GRAM] if _scope(params) == "tensor" else [],
    row_chunks=model_stock_chunks,
)
def model_stock(
    base: Tensor,
    tensors: Sequence[Tensor],
    *,
    scope: Literal["tensor", "row"] = "tensor",
    filter_wise: bool | None = None,
    ctx: MergeContext,
) -> Tensor:
    """Move from the base towards the average by the ratio t from the task-vector angle."""
    scope = _scope({"scope": scope, "filter_wise": filter_wise})
    if mergekit_arithmetic(ctx, base.dtype):
        return model_stock_in_dtype(base, tensors, filter_wise=scope == "row")
    deltas = deltas_(base, tensors)
    if scope == "row":
        rows = [rows_view(d) for d in deltas]
        ratio = model_stock_ratio(row_dots(rows))
    else:
        rows = [d.reshape(1, -1) for d in deltas]
        gram = ctx.model_stats.get(GRAM)  # a row chunk's: the whole tensor's
        ratio = model_stock_ratio((gram if gram is not None else tensor_gram(deltas))[None])
    mean = rows[0]
    for r in rows[1:]:
        mean.add_(r)
    mean.div_(len(rows)).mul_(ratio.to(mean.dtype))
    return base.add_(mean.reshape(base.shape))
