"""Karcher mean: the weighted Riemannian (Fréchet) mean of the inputs' directions on the
unit hypersphere, scaled by their weighted mean norm (mergekit's ``karcher``;
mergekit/merge_methods/karcher.py).

Over flattened tensors x_i with weights a_i (normalised to Σ a = 1; mergekit uses 1/N):

    n_i = |x_i|;  inputs with n_i <= tol are left out of the direction (not of the scale)
    u_i = x_i / n_i,  α_i = a_i / Σ_valid a_j
    μ_0 = normalise(Σ α_i u_i)             (the first valid u_i when |Σ α_i u_i| < tol)
    repeat at most max_iter times:
        θ_i = arccos(clamp(u_i · μ, −1, 1))                 (terms with θ_i < tol skipped)
        g   = Σ α_i θ_i / sin θ_i · (u_i − (u_i · μ) μ)     (Riemannian log map, averaged)
        stop when |g| < tol
        μ   = normalise(cos|g| μ + sin|g| g / |g|)          (exponential map)
    merged = (Σ_i a_i n_i) · μ           (every input's norm, invalid ones included)

No inputs with n_i > tol: zeros. One input: returned as it is. Same iteration, tolerance
and defaults as mergekit (max_iter 10, tol 1e-5). Works on the models themselves: a
``base_model``, if the recipe names one, is not used (list it under ``models`` to include it).
``weight`` is a splice extension (mergekit's method has none); the default 1 for every
model gives mergekit's a_i = 1/N.
In the mergekit dialect with float16 / bfloat16 inputs the iteration runs in that dtype as
mergekit's does (norms in float32), for the same bits (`_mergekit_precision`); otherwise it
runs in the compute dtype with the scalars as Python floats.
"""

import math
from collections.abc import Sequence
from typing import Annotated

import torch
from pydantic import Field
from torch import Tensor

from splice.merge.methods._mergekit_precision import karcher_in_dtype, mergekit_arithmetic
from splice.merge.registry import MergeContext, PerModel, merge_method


def karcher_mean(
    tensors: Sequence[Tensor], weights: Sequence[float], max_iter: int = 10, tol: float = 1e-5
) -> Tensor:
    """The scaled Karcher mean of ``tensors`` (see the module docstring)."""
    if len(tensors) == 1:
        return tensors[0]
    total = sum(weights)
    alphas = [w / total for w in weights]
    flat = [t.reshape(-1) for t in tensors]
    norms = [float(torch.linalg.vector_norm(f)) for f in flat]
    valid = [i for i, n in enumerate(norms) if n > tol]
    if not valid:
        return torch.zeros_like(tensors[0])
    vsum = sum(alphas[i] for i in valid)
    va = [alphas[i] / vsum for i in valid]
    units = [flat[i] / norms[i] for i in valid]
    mean = sum(a * u for a, u in zip(va, units, strict=True))
    mean_norm = float(torch.linalg.vector_norm(mean))
    mean = units[0].clone() if mean_norm < tol else mean / mean_norm
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for a, u in zip(va, units, strict=True):
            dot = max(-1.0, min(1.0, float(mean @ u)))
            theta = math.acos(dot)
            if theta < tol:
                continue
            tangent.add_(u - dot * mean, alpha=a * theta / math.sin(theta))
        g = float(torch.linalg.vector_norm(tangent))
        if g < tol:
            break
        mean = mean * math.cos(g) + tangent * (math.sin(g) / g)
        n = float(torch.linalg.vector_norm(mean))
        if n > tol:
            mean = mean / n
    scale = sum(a * n for a, n in zip(alphas, norms, strict=True))
    return (mean * scale).reshape(tensors[0].shape)


@merge_method("karcher", needs_base=False)
def karcher(
    base: Tensor | None,
    tensors: Sequence[Tensor],
    *,
    weight: PerModel[Annotated[float, Field(gt=0)]] = 1.0,
    max_iter: Annotated[int, Field(ge=0)] = 10,
    tol: Annotated[float, Field(gt=0)] = 1e-5,
    ctx: MergeContext,
) -> Tensor:
    """Riemannian (Karcher) mean of the models on the hypersphere, times their mean norm."""
    if len(tensors) > 1 and mergekit_arithmetic(ctx, tensors[0].dtype):
        total = sum(weight)
        return karcher_in_dtype(tensors, [w / total for w in weight], max_iter, tol)
    return karcher_mean(tensors, weight, max_iter=max_iter, tol=tol)
