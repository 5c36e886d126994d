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
- Statistics, splice dialect: |a|², |b|² and a · b are the Gram matrix of (a, b) in
  float64, each row's partial sum added in row order (`_row_gram`; rows along the first
  dimension), so they are the same bits whole or in row chunks: a tensor too large for its
  share of ``--memory`` is merged in row chunks with the Gram of a statistics pre-pass
  (`TensorGram`, `splice.engine.chunks`), then c_a·a + c_b·b entry by entry (two
  products and a sum in the compute dtype: the same bits in any slice).
- mergekit dialect: mergekit's own reductions (float32 over chunks of 2^20 entries and
  torch's thread ranges, `_mergekit_precision.slerp_float32`), which no row chunk's partial
  sums repeat bit for bit: not merged in row chunks.
"""

import math
from collections.abc import Mapping, Sequence
from typing import Annotated, Any

from pydantic import Field
from torch import Tensor

from splice.merge.methods._common import own_inputs
from splice.merge.methods._mergekit_precision import mergekit_arithmetic, slerp_float32
from splice.merge.methods._row_gram import tensor_gram
from splice.merge.registry import Dialect, MergeContext, merge_method
from splice.merge.stats import TensorGram

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


GRAM = TensorGram(of_delta=False)  # of (base, other)


def slerp_chunks(params: Mapping[str, Any], dialect: Dialect, ndim: int) -> bool:
    """``row_chunks`` of SLERP: elementwise given the Gram of (base, other), in the splice
    dialect (the mergekit dialect's reductions span the whole tensor)."""
    return dialect == "splice"


@merge_method(
    "slerp",
    needs_base=True,
    min_models=1,
    max_models=1,
    model_stats=lambda params: [GRAM],
    row_chunks=slerp_chunks,
)
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
    gram = ctx.model_stats.get(GRAM)  # a row chunk's: the whole tensor's
    if gram is None:
        gram = tensor_gram([base, other])
    norm_a, norm_b = math.sqrt(float(gram[0, 0])), math.sqrt(float(gram[1, 1]))
    dot = float(gram[0, 1])
    ca, cb = slerp_coefficients(norm_a, norm_b, dot, t, ctx.dialect == "splice")
    # c_a·a + c_b·b as two products and a sum: torch's vectorised add with ``alpha`` rounds
    # 16-bit entries otherwise than its scalar tail, which would tie the bits to a chunk's
    # length
    return base.mul_(ca).add_(other.mul_(cb))
