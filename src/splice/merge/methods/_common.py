"""Building blocks shared by the task-vector methods (task arithmetic family, TIES family).

All functions work in place on the tensors they are given (the registry allows methods to
modify their inputs) and follow the order of operations of mergekit's generalized task
arithmetic: delta -> sparsify (per model, unweighted) -> multiply by weight -> combine ->
(normalize) -> multiply by lambda -> add to base.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal

import torch
from pydantic import Field
from torch import Tensor

from splice.delta.topk import (
    keep_count,
    kth_largest,
    magnitude,
    mask_,
    topk_mask,
    trim_torch_sort_,
)
from splice.merge.reductions import sum_last
from splice.merge.registry import Dialect, MergeContext, PerModel
from splice.merge.sparsify import keep_rule_mask, keep_rule_trim_, l1_sum, l1_threads, rescale_l1
from splice.merge.stats import KeepMask, KeepRule, TensorTopK, TopKThreshold

try:
    from splice.merge.methods import _ties_kernel
except ImportError:  # built without a C compiler: the torch ops below
    _ties_kernel = None

UnitFloat = Annotated[float, Field(ge=0, le=1)]
Majority = Literal["sum", "count"]
Disjoint = Literal["mean", "sum", "max"]
TrimScope = Literal["model", "tensor"]


def own_inputs(base: Tensor | None, tensors: Sequence[Tensor]) -> list[Tensor]:
    """The inputs, with any tensor that shares storage with the base or with an earlier
    input replaced by a copy, so that in-place arithmetic cannot corrupt another input."""
    seen = set() if base is None else {base.data_ptr()}
    out = []
    for t in tensors:
        ptr = t.data_ptr()
        if ptr in seen and t.numel() > 0:
            t = t.clone()
            ptr = t.data_ptr()
        seen.add(ptr)
        out.append(t)
    return out


def deltas_(base: Tensor, tensors: Sequence[Tensor]) -> list[Tensor]:
    """Task vectors δ_i = θ_i − base, computed in place in the input tensors."""
    return [t.sub_(base) for t in own_inputs(base, tensors)]


def trim_requests(params: Mapping[str, Any]) -> list[TopKThreshold | TensorTopK]:
    """The statistics of a magnitude trim: one request per model whose density is strictly
    between 0 and 1 (0 and 1 need no statistic), whole-model (`TopKThreshold`) with
    ``scope="model"``, else per tensor (`TensorTopK`, answered only in row chunks)."""
    kind = TopKThreshold if params["scope"] == "model" else TensorTopK
    return [kind(i, d) for i, d in enumerate(params["density"]) if 0 < d < 1]


def elementwise(params: Mapping[str, Any], dialect: Dialect, ndim: int) -> bool:
    """`merge_method`'s ``row_chunks`` for an elementwise method: always."""
    return True


def trim_chunks(params: Mapping[str, Any], dialect: Dialect, ndim: int) -> bool:
    """``row_chunks`` of a magnitude trim then an elementwise combine: the trim is
    elementwise given its `KeepRule` (the engine answers one per chunk), except the L1
    rescale, which needs the whole tensor's norms before and after the trim."""
    return not params["rescale"]


def magnitude_trim_(
    delta: Tensor,
    density: float,
    index: int,
    *,
    scope: str,
    ctx: MergeContext,
    rescale: bool,
    work: Tensor | None = None,
) -> Tensor:
    """Keep the largest-|δ| entries of one task vector, zero the rest (in place).

    scope="tensor": `keep_count` entries of this tensor (rule depends on the dialect); ties
    at the boundary in flat order, or in mergekit's sort order in the mergekit dialect; or,
    for a tensor merged in row chunks, the engine's answer to `TensorTopK` for the chunk
    (the same entries: `splice.engine.chunks`): a `KeepRule`, or in the mergekit dialect
    when ties at the threshold are split, a `KeepMask` (the chunk's rows of the whole
    tensor's selection, made by the same `trim_torch_sort_`).
    scope="model": the engine's whole-model `KeepRule`, its answer to `TopKThreshold`.
    rescale=True multiplies the kept entries to restore the tensor's L1 norm (mergekit);
    ``work``: the |δ| buffer of its sums (`splice.merge.sparsify.l1_work`), else a new one.
    """
    if density >= 1:
        return delta
    if density <= 0:
        return delta.zero_()
    if scope == "model":
        rule = ctx.stat(TopKThreshold(index, density))
    else:
        rule = ctx.model_stats.get(TensorTopK(index, density))
    if isinstance(rule, KeepMask):  # the rows of a whole-tensor selection (no rescale)
        return mask_(delta, rule.unpack(delta.shape, delta.device))
    if rule is None and scope == "tensor" and ctx.dialect == "mergekit":
        l1 = l1_norm(delta, delta, ctx.dialect, work) if rescale else None
        trim_torch_sort_(delta, keep_count(delta.numel(), density, ctx.dialect))
        if l1 is not None:
            rescale_l1(l1, delta, l1_threads(ctx.dialect), work)
        return delta
    if rule is not None and not rescale and keep_rule_trim_(delta, rule):
        return delta  # one compiled pass, the same entries kept
    mag = magnitude(delta)
    k = keep_count(delta.numel(), density, ctx.dialect)
    if rule is None and not rescale and 0 < k < delta.numel():
        # splice's own tie order (first in flat order) is a keep rule of the k-th largest
        value, above, _ = kth_largest(mag.reshape(-1), k)
        if keep_rule_trim_(delta, KeepRule(value, k - above)):
            return delta
    mask = keep_rule_mask(mag, rule) if rule is not None else topk_mask(mag, k, "flat")
    l1 = l1_norm(delta, mag, ctx.dialect, work) if rescale else None
    del mag
    mask_(delta, mask)
    if l1 is not None:
        rescale_l1(l1, delta, l1_threads(ctx.dialect), work)
    return delta


def l1_norm(delta: Tensor, mag: Tensor, dialect: str, work: Tensor | None = None) -> Tensor:
    """|δ|_1 for the L1 rescale: from the float32 magnitudes ``mag`` (serially), or in δ's
    own dtype in the mergekit dialect (mergekit sums |δ| in the compute dtype, in its
    threads' order: `l1_sum`, in ``work`` when given)."""
    if dialect == "mergekit":
        return l1_sum(delta, l1_threads(dialect), work)
    return sum_last(mag.reshape(-1), 1)


def linear_combine_(
    base: Tensor,
    deltas: Sequence[Tensor],
    weight: PerModel[float] = 1.0,
    *,
    lambda_: float = 1.0,
    normalize: bool = False,
) -> Tensor:
    """base + λ · Σ w_i δ_i [/ Σ w_i when normalize and |Σ w_i| >= 1e-8] (mergekit's
    generalized task arithmetic without consensus).

    float32 on the CPU runs as one compiled pass (`_ties_kernel.linear`: the same float32
    operations in the same order, so the same bits; the deltas are left as they were) when
    the extension is built; otherwise, and for other dtypes, the torch ops below, which
    overwrite the deltas."""
    if not deltas:
        return base
    total = sum(weight) if normalize else 0.0
    divide = normalize and abs(total) >= 1e-8
    if _linear_kernel_applies(base, deltas):
        assert _ties_kernel is not None
        weights = [float(w) for w in weight]
        _ties_kernel.linear(
            base.numpy(), [d.numpy() for d in deltas], weights, divide, total, lambda_
        )
        return base
    # Multiply, then add (not add_(d, alpha=w), which may fuse into one rounding): the same
    # roundings as mergekit's deltas.mul_(weights).sum(0), so fp32 results are bit-identical.
    merged = deltas[0].mul_(weight[0])
    for d, w in zip(deltas[1:], weight[1:], strict=True):
        merged.add_(d.mul_(w))
    if divide:
        merged.div_(total)
    return add_scaled_(base, merged, lambda_)


def _linear_kernel_applies(base: Tensor, deltas: Sequence[Tensor]) -> bool:
    """Whether `linear_combine_` can use the compiled float32 kernel (an extension built
    before it had `linear` cannot)."""
    return hasattr(_ties_kernel, "linear") and kernel_accepts(base, deltas, torch.float32, 64)


def ties_combine_(
    base: Tensor,
    deltas: Sequence[Tensor],
    weight: PerModel[float] = 1.0,
    *,
    majority: Majority = "sum",
    disjoint: Disjoint | None = None,
    normalize: bool = True,
    lambda_: float = 1.0,
    weighted_votes: bool = True,
) -> Tensor:
    """TIES sign election and disjoint merge of (already sparsified) task vectors, in place.

    v_i = w_i δ_i.  majority="sum": s = sign⁺(Σ v_i); "count": s = sign⁺(Σ sign(v_i)),
    where sign⁺(x) = +1 for x >= 0 and −1 otherwise. Entry i agrees where sign(v_i) == s
    (an exact zero never agrees).
    ``weighted_votes=False``: the election and the agreement use the unweighted δ_i instead
    (s = sign⁺(Σ δ_i), agree where sign(δ_i) == s; AdaMerging++'s order: elect on the
    trimmed vectors, then weight), and the agreeing v_i = w_i δ_i are combined as above.
    disjoint="mean": Σ_agree v_i / Σ_agree w_i (a zero divisor counts as 1);
    "sum": Σ_agree v_i;  "max": s · max_agree |v_i|. ``disjoint``, when given, wins;
    otherwise mergekit's ``normalize`` picks "mean" (true) or "sum" (false).
    Result: base + λ · merged.

    float32 on the CPU with disjoint "mean" or "sum" runs as one fused compiled pass
    (`_ties_kernel`, the same float32 operations in the same order, so the same bits) when
    the extension is built; otherwise, and for other dtypes, the torch ops below.
    """
    if not deltas:
        return base
    if disjoint is None:
        disjoint = "mean" if normalize else "sum"
    if not weighted_votes:
        return _unweighted_votes_combine_(base, deltas, weight, majority, disjoint, lambda_)
    if fused_ties_applies(base, deltas, disjoint):
        assert _ties_kernel is not None
        _ties_kernel.combine(
            base.numpy(),
            [d.numpy() for d in deltas],
            [float(w) for w in weight],
            majority == "count",
            disjoint == "mean",
            lambda_,
        )
        return base
    for d, w in zip(deltas, weight, strict=True):
        d.mul_(w)
    sign = elect_signs(deltas, majority)
    # |v_i| where v_i has the elected sign, 0 elsewhere: clamp(v_i · s, min=0)
    merged = torch.zeros_like(base)
    divisor = torch.zeros_like(base) if disjoint == "mean" else None
    for d, w in zip(deltas, weight, strict=True):
        agreeing = d.mul_(sign).clamp_(min=0)
        if disjoint == "max":
            torch.maximum(merged, agreeing, out=merged)
        else:
            merged.add_(agreeing)
        if divisor is not None:
            divisor.add_(agreeing.sign_(), alpha=w)
    return _disjoint_finish_(base, merged, sign, divisor, lambda_)


def _disjoint_finish_(
    base: Tensor, merged: Tensor, sign: Tensor, divisor: Tensor | None, lambda_: float
) -> Tensor:
    """The end of a TIES disjoint merge: base + λ · s · merged (/ divisor, a zero one read
    as 1), in place in ``base``."""
    merged.mul_(sign)
    del sign
    if divisor is not None:
        divisor.masked_fill_(divisor == 0, 1)
        merged.div_(divisor)
    return add_scaled_(base, merged, lambda_)


def _unweighted_votes_combine_(
    base: Tensor,
    deltas: Sequence[Tensor],
    weight: Sequence[float],
    majority: Majority,
    disjoint: Disjoint,
    lambda_: float,
) -> Tensor:
    """`ties_combine_` with the sign elected on the unweighted δ_i (``weighted_votes=False``):
    A_i = [sign(δ_i) == s], then Σ A_i w_i δ_i ("sum"), / Σ A_i w_i ("mean", a zero divisor
    counts as 1), or s · max_i A_i |w_i δ_i| ("max")."""
    sign = elect_signs(deltas, majority)
    merged = torch.zeros_like(base)
    divisor = torch.zeros_like(base) if disjoint == "mean" else None
    for d, w in zip(deltas, weight, strict=True):
        agreeing = d.mul_(sign).clamp_(min=0)  # |δ_i| where δ_i has the elected sign
        if divisor is not None:
            divisor.add_(agreeing.sign(), alpha=w)
        agreeing.mul_(w)
        if disjoint == "max":
            torch.maximum(merged, agreeing.abs_(), out=merged)
        else:
            merged.add_(agreeing)
    return _disjoint_finish_(base, merged, sign, divisor, lambda_)


def fused_ties_applies(base: Tensor, deltas: Sequence[Tensor], disjoint: str) -> bool:
    """Whether `ties_combine_` can use the compiled float32 kernel for these tensors."""
    return (
        _ties_kernel is not None
        and disjoint in ("mean", "sum")
        and kernel_accepts(base, deltas, torch.float32, 64)
    )


def kernel_accepts(
    base: Tensor, deltas: Sequence[Tensor], dtype: torch.dtype, max_models: int
) -> bool:
    """Whether a compiled kernel can take these tensors: at most ``max_models`` deltas, all
    of ``dtype`` on the CPU, contiguous, without autograd, and of the base's shape (the
    callers check that their extension is built)."""
    return len(deltas) <= max_models and all(
        t.dtype == dtype
        and t.device.type == "cpu"
        and t.is_contiguous()
        and not t.requires_grad
        and t.shape == base.shape
        for t in (base, *deltas)
    )


def elect_signs(votes: Sequence[Tensor], majority: Majority = "sum") -> Tensor:
    """The elected sign s = sign⁺(Σ v_i) ("sum") or sign⁺(Σ sign(v_i)) ("count"), as ±1 in
    the votes' dtype (sign⁺(x) = +1 for x >= 0, −1 otherwise)."""
    sign = torch.zeros_like(votes[0])
    for v in votes:
        sign.add_(v if majority == "sum" else v.sign())
    return sign.ge_(0).mul_(2).sub_(1)


def add_scaled_(base: Tensor, merged: Tensor, lambda_: float) -> Tensor:
    """base + λ · merged, in place in both (λ = 1 multiplies nothing)."""
    if lambda_ != 1:
        merged.mul_(lambda_)
    return base.add_(merged)
