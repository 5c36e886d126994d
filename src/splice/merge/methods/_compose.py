"""A merge method as the composition of a sparsifier and a combiner (the TIES family).

    δ_i    = θ_i − base
    δ̂_i    = sparsify(δ_i)            per model, unweighted, in place (no sparsifier: δ̂_i = δ_i)
    merged = combine(base, [δ̂_1 … δ̂_n])

Sparsifiers: magnitude top-k (`ties`), DARE's random drop (`dare`), DELLA's MagPrune
(`della`), the breadcrumbs band (`breadcrumbs`). Combiners: the weighted sum of task
arithmetic (`linear_combine_`) and TIES' sign election with disjoint merge
(`ties_combine_`). This is mergekit's order of operations (generalized task arithmetic).

Each part declares its parameters in its own signature, as a merge method does (types,
pydantic constraints, defaults): a sparsifier is ``f(deltas, *, <params>, ctx)``, a
combiner ``f(base, deltas, <params>)``. `compose` joins the two parameter lists, in the
order of `ORDER`, into the signature of one method registered with `merge_method`, so the
registry, recipe validation and ``splice methods`` see an ordinary method.

In the mergekit dialect with a float16 / bfloat16 compute dtype, the two combiners are
replaced by mergekit's own arithmetic in that dtype (`_mergekit_precision.gta_combine`), so
the roundings and the sign election match mergekit bit for bit; everywhere else (the splice
dialect, float32) the combiners above run unchanged.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any, get_type_hints

from torch import Tensor

from splice.merge.methods._common import deltas_, linear_combine_, ties_combine_
from splice.merge.methods._mergekit_precision import gta_combine, mergekit_low_precision
from splice.merge.registry import MergeContext, MergeMethod, merge_method

# Parameter order of a composed method (as the methods' signatures had it before they were
# composed; the README's method table follows it). Others go last, in declaration order.
ORDER = (
    "weight",
    "density",
    "epsilon",
    "gamma",
    "lambda_",
    "normalize",
    "disjoint",
    "majority",
    "weighted_votes",
    "rescale",
    "scope",
)


def _parameters(fn: Callable[..., Any], skip: int) -> list[inspect.Parameter]:
    """The parameters of ``fn`` after its ``skip`` positional tensor arguments (ctx
    excluded), as keyword-only parameters with evaluated annotations."""
    hints = get_type_hints(fn, include_extras=True)
    return [
        p.replace(kind=inspect.Parameter.KEYWORD_ONLY, annotation=hints[p.name])
        for p in list(inspect.signature(fn).parameters.values())[skip:]
        if p.name != "ctx"
    ]


def compose(
    name: str,
    sparsify: Callable[..., None] | None,
    combine: Callable[..., Tensor],
    *,
    summary: str,
    defaults: Mapping[str, Any] | None = None,
    **registration: Any,
) -> MergeMethod:
    """Register ``name`` = ``combine`` after ``sparsify`` (a method that needs a base).

    ``summary`` is the method's one-line description (``splice methods``); ``defaults``
    replaces a part's default for this method; ``registration`` goes to `merge_method`.
    """
    sparse_params = [] if sparsify is None else _parameters(sparsify, 1)
    combine_params = _parameters(combine, 2)
    sparse_names = [p.name for p in sparse_params]
    combine_names = [p.name for p in combine_params]
    if set(sparse_names) & set(combine_names):
        raise TypeError(f"{name}: sparsifier and combiner share parameter names")
    overrides = dict(defaults or {})
    params = [p.replace(default=overrides.pop(p.name, p.default)) for p in sparse_params]
    params += [p.replace(default=overrides.pop(p.name, p.default)) for p in combine_params]
    if overrides:
        raise TypeError(f"{name}: defaults for unknown parameters {sorted(overrides)}")
    params.sort(key=lambda p: ORDER.index(p.name) if p.name in ORDER else len(ORDER))

    def method(base: Tensor, tensors: list[Tensor], *, ctx: MergeContext, **kw: Any) -> Tensor:
        deltas = deltas_(base, tensors)
        if sparsify is not None:
            sparsify(deltas, ctx=ctx, **{k: kw[k] for k in sparse_names})
        if mergekit_low_precision(ctx, base.dtype):
            merged = _mergekit_combine(combine, base, deltas, kw)
            if merged is not None:
                return merged
        return combine(base, deltas, **{k: kw[k] for k in combine_names})

    positional = inspect.Parameter.POSITIONAL_OR_KEYWORD
    method.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [
            inspect.Parameter("base", positional),
            inspect.Parameter("tensors", positional),
            *params,
            inspect.Parameter("ctx", inspect.Parameter.KEYWORD_ONLY),
        ]
    )
    method.__annotations__ = {p.name: p.annotation for p in params}
    method.__name__ = method.__qualname__ = name
    method.__doc__ = summary
    return merge_method(name, needs_base=True, **registration)(method)


def _mergekit_combine(
    combine: Callable[..., Tensor], base: Tensor, deltas: list[Tensor], kw: Mapping[str, Any]
) -> Tensor | None:
    """``combine`` done with mergekit's low-precision arithmetic; None when mergekit has no
    such combination (disjoint="max", or a combiner other than the two above)."""
    if combine is linear_combine_:
        return gta_combine(
            base,
            deltas,
            kw["weight"],
            consensus=None,
            normalize=kw["normalize"],
            lambda_=kw["lambda_"],
        )
    if combine is ties_combine_:
        if not kw["weighted_votes"]:
            return None  # no such election in mergekit: splice's combiner
        disjoint = kw["disjoint"] or ("mean" if kw["normalize"] else "sum")
        if disjoint == "max":
            return None
        return gta_combine(
            base,
            deltas,
            kw["weight"],
            consensus=kw["majority"],
            normalize=disjoint == "mean",
            lambda_=kw["lambda_"],
        )
    return None
