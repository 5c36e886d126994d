"""`Folded`: adapters that transform W instead of adding to it; ΔW = f(W) − W.

Their delta exists only against a given base, so `to_dense(base)` needs it. Transforms
(each with the paper's / PEFT's formula; W is the weight in its stored layout):

    scale        W' = W ⊙ v                v broadcasts against W (IA3: per output row
                                           v[:, None], per input column v[None, :])
    matmul_right W' = W M                  OFT on a Linear: M = Rᵀ (in×in)
    matmul_left  W' = M W                  OFT on GPT-2 Conv1D (W stored in×out): M = R
    dora         W' = c ⊙ (W + s·B A),     DoRA (Liu et al. 2024): m is the learned magnitude,
                 c = m / ‖W + s·B A‖        the norm over every dim but 0 (per output feature),
                                           treated as a constant (detached), as PEFT

`scale` is exact under `scale()` (ΔW scales linearly); the others are not linear in their
parameters, so `scale(c)` scales the resulting ΔW: it keeps a `factor` applied after f.
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

Transform = Callable[[Tensor, dict[str, Tensor], dict[str, Any]], Tensor]
_TRANSFORMS: dict[str, Transform] = {}


def folded_transform(name: str) -> Callable[[Transform], Transform]:
    def register(fn: Transform) -> Transform:
        _TRANSFORMS[name] = fn
        return fn

    return register


@folded_transform("scale")
def _scale(w: Tensor, p: dict[str, Tensor], _: dict[str, Any]) -> Tensor:
    return w * p["vector"].float()


@folded_transform("matmul_right")
def _matmul_right(w: Tensor, p: dict[str, Tensor], _: dict[str, Any]) -> Tensor:
    return w @ p["matrix"].float()


@folded_transform("matmul_left")
def _matmul_left(w: Tensor, p: dict[str, Tensor], _: dict[str, Any]) -> Tensor:
    return p["matrix"].float() @ w


@folded_transform("dora")
def _dora(w: Tensor, p: dict[str, Tensor], opts: dict[str, Any]) -> Tensor:
    lora = (p["b"].float() @ p["a"].float()).reshape(w.shape) * float(opts.get("lora_scale", 1.0))
    adapted = w + lora
    norm = adapted.norm(p=2, dim=tuple(range(1, w.dim())))
    c = p["magnitude"].float().reshape(-1) / norm
    return c.reshape(-1, *([1] * (w.dim() - 1))) * adapted


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
        d = _TRANSFORMS[self.transform](w, self.params, self.options) - w
        return (d * self.factor).to(dtype)

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
