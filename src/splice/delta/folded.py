"""`Folded`: adapters that transform W instead of adding to it; ΔW = f(W) − W.

Their delta exists only against a given base, so `to_dense(base)` needs it. Transforms, each
registered as its ΔW (written to avoid cancellation where it can; W in its stored layout):

    scale        ΔW = W ⊙ (v − 1)           W' = W ⊙ v, v broadcasting against W (IA3: per
                                             output row v[:, None], per input column v[None, :])
    matmul_right ΔW = W M − W                OFT / HRA on a Linear: M = Rᵀ (in×in)
    matmul_left  ΔW = M W − W                OFT / HRA on GPT-2 Conv1D (W stored in×out)
    dora         ΔW = c ⊙ (W + s·B A) − W,   DoRA (Liu et al. 2024): m is the learned magnitude,
                 c = m / ‖W + s·B A‖         the norm over every dim but 0 (per output
                                             feature), a constant (detached) as in PEFT;
                                             option ``transposed``: W is stored in×out (Conv1D,
                                             embeddings) and the formula applies to Wᵀ

None is linear in its parameters, so `scale(c)` scales the resulting ΔW (a `factor`).
Adding a transform is one function registered with `@folded_transform(name)`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from splice.delta._common import DeltaOps, element_bytes
from splice.delta.base import Delta, DeltaError, check_factor, delta_type

DeltaOf = Callable[[Tensor, dict[str, Tensor], dict[str, Any]], Tensor]
_TRANSFORMS: dict[str, DeltaOf] = {}


def folded_transform(name: str) -> Callable[[DeltaOf], DeltaOf]:
    """Register ``fn(W, params, options) -> ΔW`` (float32 W in) under ``name``."""

    def register(fn: DeltaOf) -> DeltaOf:
        _TRANSFORMS[name] = fn
        return fn

    return register


@folded_transform("scale")
def _scale(w: Tensor, p: dict[str, Tensor], _: dict[str, Any]) -> Tensor:
    return w * (p["vector"].float() - 1)


@folded_transform("matmul_right")
def _matmul_right(w: Tensor, p: dict[str, Tensor], _: dict[str, Any]) -> Tensor:
    return w @ p["matrix"].float() - w


@folded_transform("matmul_left")
def _matmul_left(w: Tensor, p: dict[str, Tensor], _: dict[str, Any]) -> Tensor:
    return p["matrix"].float() @ w - w


def dora_factor(magnitude: Tensor, weight: Tensor, lora: Tensor) -> Tensor:
    """DoRA's c = m / ‖W + ΔW_lora‖ per output feature (the L2 norm over every dim but 0),
    the norm detached from the graph (DoRA §4.3, as PEFT). The one place of this formula:
    the LoRA layers' DoRA forward, the `dora` transform and the PEFT fold use it."""
    norm = (weight + lora).norm(p=2, dim=tuple(range(1, weight.dim()))).detach()
    return magnitude.reshape(-1) / norm


@folded_transform("dora")
def _dora(w: Tensor, p: dict[str, Tensor], opts: dict[str, Any]) -> Tensor:
    transposed = bool(opts.get("transposed", False))
    if transposed:
        w = w.T
    lora = (p["b"].float() @ p["a"].float()).reshape(w.shape) * float(opts.get("lora_scale", 1.0))
    c = dora_factor(p["magnitude"].float(), w, lora)
    d = c.reshape(-1, *([1] * (w.dim() - 1))) * (w + lora) - w
    return d.T if transposed else d


def _dora_weight(
    w: Tensor, p: dict[str, Tensor], opts: dict[str, Any], dtype: torch.dtype
) -> Tensor:
    """DoRA's W' = c ⊙ (W + s·B A) directly, W in its stored layout and the float dtype
    that PEFT's merge uses (factors in ``dtype``, W promoted to it): bit for bit
    ``merge_and_unload``."""
    transposed = bool(opts.get("transposed", False))
    product = p["b"].to(dtype) @ p["a"].to(dtype)
    lora = (product.T if transposed else product.reshape(w.shape)) * float(opts["lora_scale"])
    magnitude = p["magnitude"].to(dtype)
    merged = w + lora
    if transposed:
        return dora_factor(magnitude, w.T, lora.T).view(1, -1) * merged
    return dora_factor(magnitude, w, lora).reshape(-1, *([1] * (w.dim() - 1))) * merged


# W' = f(W) directly, for transforms whose W + ΔW would round differently from PEFT's merge
_WEIGHTS = {"dora": _dora_weight}


@delta_type("folded")
@dataclass(frozen=True)
class Folded(DeltaOps):
    transform: str
    params: dict[str, Tensor]
    size: tuple[int, ...]
    options: dict[str, Any] = field(default_factory=dict)
    factor: float = 1.0

    def __post_init__(self) -> None:
        if self.transform not in _TRANSFORMS:
            raise DeltaError(
                f"unknown folded transform '{self.transform}' (known: {sorted(_TRANSFORMS)})"
            )
        object.__setattr__(self, "size", tuple(int(s) for s in self.size))
        check_factor(self.factor)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.size

    @property
    def nbytes(self) -> int:
        return sum(element_bytes(t) for t in self.params.values())

    def to_dense(self, base: Tensor | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
        if base is None:
            raise DeltaError(
                f"a '{self.transform}' delta is a transform of the base weight: "
                "to_dense needs the base"
            )
        if tuple(base.shape) != self.size:
            raise DeltaError(f"base shape {list(base.shape)} != delta shape {list(self.size)}")
        w = base.float()
        d = _TRANSFORMS[self.transform](w, self.params, self.options)
        return (d * self.factor).to(dtype)

    def applied(self, base: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        """W' = W + ΔW in the wider of ``dtype`` and the base's (see `apply_delta`); the
        transform's own W' when it has one (DoRA) and ``factor`` is 1."""
        wide = torch.promote_types(base.dtype, dtype)
        weight = _WEIGHTS.get(self.transform)
        if weight is not None and self.factor == 1.0:
            return weight(base.to(wide), self.params, self.options, dtype)
        return base.to(wide) + self.to_dense(base, dtype)

    def scale(self, factor: float) -> Folded:
        return Folded(
            self.transform, self.params, self.size, self.options, self.factor * check_factor(factor)
        )

    def tensors(self) -> dict[str, Tensor]:
        return dict(self.params)

    def attributes(self) -> dict[str, Any]:
        return {
            "transform": self.transform,
            "size": list(self.size),
            "options": self.options,
            "factor": self.factor,
        }

    @classmethod
    def from_parts(cls, tensors: dict[str, Tensor], attrs: dict[str, Any]) -> Delta:
        return cls(params=tensors, **attrs)
