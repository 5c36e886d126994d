"""RegMean (Jin et al. 2023, "Dataless Knowledge Fusion by Merging Weights of Language
Models").

For a linear layer y = W x (W: d_out x d_in) and each model's Gram matrix of the layer's
inputs G_i = X_iᵀ X_i (d_in x d_in; `splice.merge.data_stats.collect_gram`), the merged
weight minimizes Σ_i ‖X_i Wᵀ − X_i W_iᵀ‖², whose closed form is

    Wᵀ = (Σ_i G̃_i)⁻¹ Σ_i G̃_i W_iᵀ,    G̃_i = α G_i + (1 − α) diag(G_i)

α (``alpha``, the paper's off-diagonal scaling, FusionBench's ``reduce_non_diagonal_ratio``)
shrinks the off-diagonal entries towards zero: α = 1 is the exact least-squares merge,
α = 0 a per-input-feature weighted average. Default 0.9 (the ``regmean_reduce_nondiag``
default of a RegMean script in the authors' dataless-model-merging repository;
FusionBench's function default is 1.0 and its configs use 0.6 for CLIP, 0.1 otherwise).
Both references let a regular expression exclude parameters (e.g. task heads) from
RegMean; here, exclude them when collecting (`collect_gram(..., exclude=...)`). Tensors
without a Gram (biases, norms, embeddings, layers the data did not reach) are averaged, as
in both reference implementations. With equal Grams (and α any) RegMean is the plain
average; for linear regressions with Grams summed over their data (reduction "sum") and
α = 1 it is the least-squares solution on the union of the data.

The solve runs in float64 (`torch.linalg.solve`; the references invert the sum). A singular
Σ G̃_i (an input feature that is zero on every model's data) is an error.
No base model is used. Memory per tensor: the n weights and n Grams, plus one d_in x d_in
float64 sum.
"""

from collections.abc import Sequence
from typing import Annotated

import torch
from pydantic import Field
from torch import Tensor

from splice.errors import MergeValidationError
from splice.merge.registry import MergeContext, merge_method
from splice.merge.stats import DataStatistic

GRAM = DataStatistic("gram")


@merge_method("regmean", needs_base=False, data_statistics=["gram"])
def regmean(
    base: Tensor | None,
    tensors: Sequence[Tensor],
    *,
    alpha: Annotated[float, Field(ge=0, le=1)] = 0.9,
    ctx: MergeContext,
) -> Tensor:
    """Regression mean: the least-squares merge of linear layers from their input Grams."""
    grams = ctx.stat(GRAM).per_model
    present = [g is not None for g in grams]
    if not any(present):
        return torch.stack(list(tensors)).mean(dim=0)
    if not all(present):
        missing = [i for i, p in enumerate(present) if not p]
        raise MergeValidationError(
            f"tensor '{ctx.tensor_name}': models {missing} have no Gram matrix for it but "
            "others do (missing statistic); collect statistics for every model"
        )
    gram_sum = None
    rhs = None
    for w, g in zip(tensors, grams, strict=True):
        assert g is not None
        g = g.to(w.device, torch.float64)
        g_tilde = g * alpha + torch.diag(torch.diagonal(g)) * (1 - alpha)
        term = g_tilde @ w.double().T
        gram_sum = g_tilde if gram_sum is None else gram_sum + g_tilde
        rhs = term if rhs is None else rhs + term
    assert gram_sum is not None and rhs is not None
    solution, info = torch.linalg.solve_ex(gram_sum, rhs)
    if int(info) != 0 or not bool(torch.isfinite(solution).all()):
        raise MergeValidationError(
            f"tensor '{ctx.tensor_name}': the summed Gram matrix is singular (an input feature "
            "is zero on every model's data); RegMean cannot solve for this layer"
        )
    return solution.T.to(tensors[0].dtype).contiguous()
