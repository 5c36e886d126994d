"""SLERP: spherical linear interpolation between the base and one other model
(Shoemake 1985; as popularised for model merging by mergekit).

Over the flattened tensor, with a = base, b = the other model:

    cos Ω = (a · b) / (|a| |b|)        clamped to [−1, 1]
    merged = sin((1 − t) Ω) / sin Ω · a + sin(t Ω) / sin Ω · b
    merged = (1 − t) a + t b           when |cos Ω| > 0.9995 (nearly (anti)parallel)

t = 0 gives the base, t = 1 the other model. The vectors themselves are interpolated
(not their normalised directions), as in mergekit.

Choices:
- Whole-tensor SLERP in both dialects. mergekit 0.1.5's kernel keeps a leading axis, but
  that axis is its batch of *tensors* (one row per merged tensor); each tensor is
  interpolated as one flattened vector, which is what splice does.
- Zero-norm guard: mergekit replaces a norm <= 1e-8 by 1, which for a zero vector gives
  cos Ω = 0 and the weights sin((1 − t)π/2), sin(tπ/2); that is what the mergekit dialect
  computes. The splice dialect interpolates linearly when either norm is <= 1e-8 (the
  direction of a zero vector is undefined).
- ``t`` must lie in [0, 1] (no extrapolation).
"""

import math
from collections.abc import Sequence
from typing import Annotated

import torch
from pydantic import Field
from torch import Tensor

from splice.merge.methods._common import own_inputs
from splice.merge.methods._mergekit_precision import mergekit_arithmetic, slerp_float32
from splice.merge.registry import MergeContext, merge_method

DOT_THRESHOLD = 0.9995
EPS = 1e-8


def slerp_coefficients(
    norm_a: float, norm_b: float, dot: float, t: float, zero_norm_linear: bool
) -> tuple[float, float]:
    """(c_a, c_b) with merged = c_a · a + c_b · b, from |a|, |b| and a · b."""
    if zero_norm_linear and (norm_a <= EPS or norm_b <= EPS):
        return 1 - t, t
    na = norm_a if norm_a > EPS else 1.0
    nb = norm_b if norm_b > EPS else 1.0
    cos = max(-1.0, min(1.0, dot / na / nb))
    if abs(cos) > DOT_THRESHOLD:
        return 1 - t, t
    omega = math.acos(cos)
    s = math.sin(omega)
    return math.sin((1 - t) * omega) / s, math.sin(t * omega) / s


@merge_method("slerp", needs_base=True, min_models=1, max_models=1)
def slerp(
    base: Tensor,
    tensors: Sequence[Tensor],
    *,
    t: Annotated[float, Field(ge=0, le=1)],
    ctx: MergeContext,
) -> Tensor:
    """Spherical interpolation from the base (t = 0) to the other model (t = 1)."""
    (other,) = own_inputs(base, tensors)
    if mergekit_arithmetic(ctx, base.dtype):
        return slerp_float32(base, other, t)
    a, b = base.reshape(-1), other.reshape(-1)
    norm_a = float(torch.linalg.vector_norm(a, dtype=torch.float32))
    norm_b = float(torch.linalg.vector_norm(b, dtype=torch.float32))
    dot = float((a * b).sum(dtype=torch.float32))
    ca, cb = slerp_coefficients(norm_a, norm_b, dot, t, ctx.dialect == "splice")
    return base.mul_(ca).add_(other, alpha=cb)
