"""The delta protocol: every adaptation is a delta on one named parameter.

A delta ΔW says how one base tensor W changes. Its types differ only in how ΔW is stored:

    Dense      ΔW itself
    LowRank    ΔW = s · B A (or its transpose), B: out×r, A: r×in
    Sparse     ΔW zero except at flat indices, where it takes `values`
    Ternary    ΔW = γ · T with T in {−1, 0, +1} (ComPEFT, BitDelta-style)
    Folded     ΔW = f(W) − W for a transform f that is not additive (DoRA's column norm,
               IA3's scaling, OFT's rotation): only defined against a given base

One protocol serves all of them: `shape`, `nbytes`, `to_dense(base=None, dtype=float32)`,
`scale(c)`, `add(other)`, and (de)serialization to safetensors tensors plus a one-line
metadata string (`to_tensors` / `delta_from_tensors`). Adding a delta type is one file: a
frozen dataclass implementing the protocol, decorated with `@delta_type("name")`.

Choices:
- `to_dense` is float32 unless asked; only `Folded` needs the base, any other type ignores it.
  A `Dense` delta may return its own tensor: treat the result as read-only.
- `add` keeps the most specific exact type: LowRank + LowRank concatenates factors (ranks
  add), Sparse + Sparse unions indices; anything else is Dense
  (and needs the base when a `Folded` is involved). Shapes must match.
- Numbers are checked finite (`scale`), shapes at construction: a bad delta fails where it
  is made, not where it is used.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import Tensor

from splice.errors import SpliceError
from splice.numbers import check_number


class DeltaError(SpliceError):
    """A delta cannot be built, combined or read back as asked."""


@runtime_checkable
class Delta(Protocol):
    """The protocol every delta type implements (see the module docstring)."""

    kind: ClassVar[str]

    @property
    def shape(self) -> tuple[int, ...]: ...

    @property
    def nbytes(self) -> int: ...

    def to_dense(
        self, base: Tensor | None = None, dtype: torch.dtype = torch.float32
    ) -> Tensor: ...

    def scale(self, factor: float) -> Delta: ...

    def add(self, other: Delta, base: Tensor | None = None) -> Delta: ...

    def tensors(self) -> dict[str, Tensor]:
        """The stored tensors by field name (for serialization)."""
        ...

    def attributes(self) -> dict[str, Any]:
        """The non-tensor fields, JSON-serializable (for serialization)."""
        ...


_TYPES: dict[str, Callable[..., Delta]] = {}


def delta_type(kind: str) -> Callable[[type], type]:
    """Class decorator: register a delta type under `kind` (its serialized name)."""

    def register(cls: type) -> type:
        if kind in _TYPES:
            raise ValueError(f"delta type '{kind}' is registered twice")
        cls.kind = kind  # type: ignore[attr-defined]
        _TYPES[kind] = cls
        return cls

    return register


def delta_types() -> list[str]:
    return sorted(_TYPES)


def check_factor(factor: float) -> float:
    """``float(factor)`` when finite, else a DeltaError (`splice.numbers.check_number`)."""
    return check_number(float(factor), "a delta's scale factor", error=DeltaError)


def check_shape(shape: tuple[int, ...], other: Delta) -> None:
    if tuple(other.shape) != tuple(shape):
        raise DeltaError(f"cannot add deltas of shapes {list(shape)} and {list(other.shape)}")


def apply_delta(base: Tensor, delta: Delta, dtype: torch.dtype = torch.float32) -> Tensor:
    """W + ΔW rounded once to the base's dtype: ΔW computed in ``dtype``, the sum in the wider
    of ``dtype`` and the base's (a float64 base or adapter stays float64; PEFT's in-place
    merge). A delta with ``applied(base, dtype)`` (`Folded` DoRA) gives W' itself, computed
    as PEFT merges it, not as W + (W' − W), which can differ in the last bit."""
    applied = getattr(delta, "applied", None)
    if applied is not None:
        return applied(base, dtype).to(base.dtype)
    wide = torch.promote_types(base.dtype, dtype)
    return (base.to(wide) + delta.to_dense(base, dtype)).to(base.dtype)


def to_tensors(name: str, delta: Delta) -> tuple[dict[str, Tensor], str]:
    """The delta's tensors under keys `name.FIELD`, and its metadata line (JSON)."""
    tensors = {f"{name}.{k}": v.contiguous() for k, v in delta.tensors().items()}
    meta = json.dumps({"type": delta.kind, **delta.attributes()}, sort_keys=True)
    return tensors, meta


def delta_from_tensors(name: str, tensors: dict[str, Tensor], meta: str) -> Delta:
    """Inverse of `to_tensors`: rebuild the delta `name` from its keys and metadata line."""
    try:
        attrs = json.loads(meta)
        kind = attrs.pop("type")
    except (ValueError, AttributeError, KeyError, TypeError) as e:
        raise DeltaError(f"delta '{name}': unreadable metadata") from e
    cls = _TYPES.get(kind)
    if cls is None:
        raise DeltaError(f"delta '{name}': unknown type '{kind}' (known: {delta_types()})")
    prefix = name + "."
    fields = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    try:
        return cls.from_parts(fields, attrs)  # type: ignore[attr-defined]
    except TypeError as e:
        raise DeltaError(f"delta '{name}' ({kind}): fields do not match: {e}") from e
