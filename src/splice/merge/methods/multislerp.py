"""Multi-SLERP: barycentric interpolation of N tensors on a hypersphere (mergekit's
``multislerp``, after C. Goddard, "Multi-SLERP"; mergekit/merge_methods/multislerp.py).

With x_i = θ_i − base when a base model is given (θ_i otherwise), flattened, and weights
w_i (normalised to Σ w = 1 when ``normalize_weights``):

    n_i = |x_i|,   u_i = x_i / (n_i + ε)                       points on the unit sphere
    m   = Σ w_i u_i,   μ = m / |m|                             weighted Euclidean mean
    t   = Σ w_i (u_i − (u_i · μ) μ)                            tangent vectors at μ, averaged
    r   = μ cos(|t| + ε) + t sin(|t| + ε) / (|t| + ε)          exponential map back
    merged = [base +] (Σ w_i n_i) · r

Note: Σ w_i (u_i − (u_i·μ) μ) = m − |m| μ = 0, so the tangent step changes nothing (up to ε)
and the result is the direction of the weighted mean of the unit vectors times the weighted
mean norm; it is kept for operation-for-operation parity with mergekit.

Same as mergekit, including its choices:
- One input: that input is returned (the base is not used).
- Every x_i = 0 (all inputs equal to the base, e.g. a tensor that no LoRA expert touched):
  the base (zeros without one). mergekit raises here as for antipodal inputs; splice
  returns the only sensible merge.
- |m| < ε (antipodal inputs whose weights cancel): two inputs fall back to the linear
  combination w_0 x_0 + w_1 x_1 [+ base]; more inputs are an error.
- ``weight`` is per model and required (mergekit has no default); ε = ``eps`` = 1e-8.
- A base model is optional; list it only as ``base_model`` (an input equal to the base is a
  zero task vector and still counts in the mean, as in mergekit when it is listed twice).
- Arithmetic in the compute dtype. In the mergekit dialect with float16 / bfloat16 the dots
  u_i · μ are mergekit's elementwise product then sum (each product rounded to the dtype),
  not a matrix-vector product, for the same bits.
"""

from collections.abc import Sequence

import torch
from torch import Tensor

from splice.errors import MergeValidationError
from splice.merge.methods._mergekit_precision import mergekit_low_precision
from splice.merge.registry import MergeContext, PerModel, merge_method


@merge_method("multislerp", needs_base=False)
def multislerp(
    base: Tensor | None,
    tensors: Sequence[Tensor],
    *,
    weight: PerModel[float],
    normalize_weights: bool = True,
    eps: float = 1e-8,
    ctx: MergeContext,
) -> Tensor:
    """Spherical barycentre of the inputs (or of their task vectors, given a base)."""
    if len(tensors) == 1:
        return tensors[0]
    shape = tensors[0].shape
    x = torch.stack([t.reshape(-1) for t in tensors])
    if base is not None:
        x.sub_(base.reshape(-1))
    w = torch.tensor(weight, dtype=x.dtype)
    if normalize_weights:
        w = w / w.sum()
    norms = torch.linalg.vector_norm(x, dim=1, keepdim=True)
    if not torch.any(norms):  # every input equals the base (e.g. a tensor no LoRA touched)
        out = torch.zeros(shape, dtype=x.dtype)
        return out if base is None else out.add_(base)
    units = x / (norms + eps)
    mean = (units * w[:, None]).sum(0)
    mean_norm = torch.linalg.vector_norm(mean)
    if mean_norm < eps:
        if len(tensors) == 2:
            out = (x[0] * w[0] + x[1] * w[1]).reshape(shape)
            return out if base is None else out.add_(base)
        raise MergeValidationError(
            f"tensor '{ctx.tensor_name}': multislerp: the weighted mean direction is zero "
            "(antipodal inputs whose weights cancel); use different weights"
        )
    mean = mean / mean_norm
    # mergekit in float16 / bfloat16 rounds each product to the dtype before the sum
    low = mergekit_low_precision(ctx, x.dtype)
    dots = (units * mean).sum(-1) if low else units @ mean
    tangent = ((units - dots[:, None] * mean) * w[:, None]).sum(0)
    tnorm = torch.linalg.vector_norm(tangent) + eps
    result = mean * torch.cos(tnorm) + tangent * (torch.sin(tnorm) / tnorm)
    result = result.mul_((norms.squeeze(1) * w).sum()).reshape(shape)
    return result if base is None else result.add_(base)
