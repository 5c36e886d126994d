"""User-given numbers: finite, and inside their documented range, or refused up front.

Every float a user gives (a recipe, a config file, a flag, an adapter config read from disk)
must be a finite number; NaN and ±inf are refused with a message naming the key or flag,
before any tensor is read. Where the number has a documented range (a density in (0, 1], a
dropout in [0, 1), a positive learning rate, ...) the range is enforced where the number is
declared, once:

- pydantic models (recipes, train / bench / adapter configs) declare ``FINITE`` in their
  ``model_config`` (pydantic's ``allow_inf_nan=False``, which also covers union-typed fields
  and containers) and their ranges with ``Field(gt=..., le=...)``;
- a plain function taking a number (a library entry point such as `extract_lora`) checks it
  with `check_number`, which raises the caller's `SpliceError` subclass;
- free-form containers whose values are typed ``Any`` (a bench config's ``merge.params``) are
  searched with `first_nonfinite`.

Why refuse rather than pass them on: a NaN weight or an infinite learning rate turns every
output value into NaN / inf (or an empty result) while the command still exits 0.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import ConfigDict

from splice.errors import MergeValidationError, SpliceError

FINITE = ConfigDict(allow_inf_nan=False)
"""``model_config`` entries that make pydantic refuse NaN / ±inf in every float field."""


def is_finite_number(value: Any) -> bool:
    """True for an int or a finite float (bools are not numbers here)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return math.isfinite(value)


def _interval(gt: float | None, ge: float | None, lt: float | None, le: float | None) -> str:
    if (gt is not None or ge is not None) and (lt is not None or le is not None):
        left = f"({gt:g}" if gt is not None else f"[{ge:g}"
        right = f"{lt:g})" if lt is not None else f"{le:g}]"
        return f"in {left}, {right}"
    if gt is not None:
        return f"greater than {gt:g}"
    if ge is not None:
        return f"at least {ge:g}"
    if lt is not None:
        return f"less than {lt:g}"
    return f"at most {le:g}"


def check_number(
    value: Any,
    name: str,
    *,
    gt: float | None = None,
    ge: float | None = None,
    lt: float | None = None,
    le: float | None = None,
    integer: bool = False,
    error: type[SpliceError] = MergeValidationError,
) -> Any:
    """``value`` when it is a finite number (an integer with ``integer=True``) inside the
    bounds given; else ``error("NAME = VALUE must be ...")``."""
    if integer:
        valid, kind = isinstance(value, int) and not isinstance(value, bool), "an integer"
    else:
        valid, kind = is_finite_number(value), "a finite number"
    if not valid:
        raise error(f"{name} = {value!r} must be {kind}")
    bounds = (gt, ge, lt, le)
    if any(b is not None for b in bounds):
        inside = (
            (gt is None or value > gt)
            and (ge is None or value >= ge)
            and (lt is None or value < lt)
            and (le is None or value <= le)
        )
        if not inside:
            raise error(f"{name} = {value!r} must be {_interval(*bounds)}")
    return value


def check_numbers(values: Iterable[Any], name: str, **bounds: Any) -> list[Any]:
    """`check_number` on each value (named ``NAME[i]``); returns them as a list."""
    return [check_number(v, f"{name}[{i}]", **bounds) for i, v in enumerate(values)]


def first_nonfinite(value: Any, path: str = "") -> tuple[str, float] | None:
    """(dotted path, value) of the first NaN / ±inf float inside nested mappings and lists,
    or None. Paths read ``ties.density`` / ``lambda[1]``."""
    if isinstance(value, float) and not math.isfinite(value):
        return path, value
    if isinstance(value, Mapping):
        for k, v in value.items():
            found = first_nonfinite(v, f"{path}.{k}" if path else str(k))
            if found:
                return found
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            found = first_nonfinite(v, f"{path}[{i}]")
            if found:
                return found
    return None
