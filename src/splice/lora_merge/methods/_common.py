"""What the low-rank methods share: parameter types, the default rank, the dense step of the
sparsifying methods, and their one signature."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated

import torch
from pydantic import Field

from splice.delta import LowRank
from splice.merge.registry import MergeContext, MergeMethod, PerModel, get_method, merge_method

Rank = Annotated[int, Field(ge=1)]  # an output rank
Density = Annotated[float, Field(ge=0, le=1)]  # the fraction of entries kept
# A default the registry reads as "none": the parameter is required.
REQUIRED = inspect.Parameter.empty


@dataclass(frozen=True)
class SparsifyParams:
    """The validated parameters of a sparsifying method, for one module."""

    weight: list[float]
    density: list[float]
    rank: int | None
    lambda_: float


# (dense method name, the module's factors, parameters, ctx) -> merged factors
SparsifyingMerge = Callable[[str, Sequence[LowRank], SparsifyParams, MergeContext], LowRank]


def default_rank(loras: list[LowRank], rank: int | None) -> int:
    """``rank``, else the largest input rank (PEFT's default for its *_svd combinations)."""
    return rank if rank is not None else max(f.rank for f in loras)


def merge_dense(
    method: str, tensors: Sequence[torch.Tensor], p: SparsifyParams, ctx: MergeContext
) -> torch.Tensor:
    """Dense `method` (splice's registered one) on ``tensors`` with base 0, trimming per tensor."""
    params: dict[str, object] = {"weight": list(p.weight), "lambda": p.lambda_}
    params["density"] = list(p.density)
    if method == "ties":
        params["scope"] = "tensor"
    return get_method(method)(torch.zeros_like(tensors[0]), list(tensors), ctx=ctx, **params)


def sparsifying_method(
    name: str,
    dense: str,
    merge: SparsifyingMerge,
    summary: str,
    *,
    density_default: float | object,
    random: bool,
) -> MergeMethod:
    """Register low-rank ``name``: ``merge(dense, ...)`` with one shared signature (weight,
    density, rank, lambda); ``density_default`` REQUIRED makes density a required parameter."""

    def method(
        base: None,
        tensors: Sequence[LowRank],
        *,
        weight: PerModel[float] = 1.0,
        density: PerModel[Density] = density_default,  # type: ignore[assignment]
        rank: Rank | None = None,
        lambda_: float = 1.0,
        ctx: MergeContext,
    ) -> LowRank:
        return merge(dense, tensors, SparsifyParams(weight, density, rank, lambda_), ctx)

    method.__doc__, method.__name__ = summary, name
    return merge_method(name, needs_base=False, random=random, representation="low_rank")(method)
