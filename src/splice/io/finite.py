"""Non-finite tensor values (NaN, ±inf): refused where tensors enter and where they leave.

Policy (every command that computes on tensors: merge, merge --continual, lora merge /
extract / compeft / rmm, compress, restore):

- Input: those commands open their inputs with ``open_checkpoint(ref, check_finite=True)``
  (PEFT adapter factors: `FiniteReader` directly), unless given ``--allow-nonfinite``.
  Reading a floating tensor that holds NaN / ±inf then raises `NonFiniteError` naming the
  tensor and the model reference: any arithmetic on it (a merge, an SVD) would spread NaN
  through the output or fail with a traceback. `splice inspect` reads without the check:
  it is a diagnostic tool and shows such tensors.
- Output: writers call `check_output` on each tensor after the cast to the output dtype;
  this also catches float16 / bfloat16 overflow (a finite float32 value beyond the dtype's
  range becomes ±inf), which the message says.
- In between, with the opt-in: an SVD / QR of non-finite values fails inside torch;
  `numerical_errors` turns that into one error naming the tensor instead of a traceback.

Cost: one min/max reduction per tensor (``torch.aminmax`` propagates NaN; no copy, no
mask); only a tensor that fails it is counted in detail.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import torch

from splice.errors import CheckpointError, MergeValidationError
from splice.io.base import CheckpointReader
from splice.io.mapped import read_rows

OPT_IN = "pass --allow-nonfinite to"


class NonFiniteError(CheckpointError):
    """A tensor holds NaN or ±inf values (an input, or an output after its cast)."""


def _comparable(t: torch.Tensor) -> torch.Tensor:
    # torch has no min/max (nor isinf) for the 1-byte float8 types: check a float16 copy.
    return t.to(torch.float16) if t.element_size() == 1 else t


def all_finite(t: torch.Tensor) -> bool:
    """True when every value is finite (always for integer / bool / empty tensors)."""
    if not t.is_floating_point() or t.numel() == 0:
        return True
    lo, hi = torch.aminmax(_comparable(t))
    return math.isfinite(float(lo)) and math.isfinite(float(hi))


def describe_nonfinite(t: torch.Tensor) -> str:
    """'3 non-finite values (2 NaN, 1 inf)' for a tensor that is not `all_finite`."""
    t = _comparable(t)
    nan = int(torch.isnan(t).sum())
    inf = int(torch.isinf(t).sum())
    parts = [f"{n} {kind}" for n, kind in ((nan, "NaN"), (inf, "inf")) if n]
    total = nan + inf
    return f"{total} non-finite value{'s' if total != 1 else ''} ({', '.join(parts)})"


def check_input(t: torch.Tensor, name: str, source: str) -> torch.Tensor:
    """``t`` unchanged, or NonFiniteError naming the tensor and where it came from."""
    if not all_finite(t):
        raise NonFiniteError(
            f"{source}: tensor '{name}' has {describe_nonfinite(t)}; {OPT_IN} use them anyway"
        )
    return t


def check_output(t: torch.Tensor, name: str) -> None:
    """NonFiniteError when the output tensor ``t`` (already in its output dtype) holds
    NaN / ±inf; for float16 / bfloat16 the message gives the dtype's range, since a finite
    value beyond it becomes inf in the cast."""
    if all_finite(t):
        return
    dtype = str(t.dtype).removeprefix("torch.")
    where = f"in {dtype}"
    if t.dtype in (torch.float16, torch.bfloat16) and bool(torch.isinf(t).any()):
        where += f", whose range is ±{torch.finfo(t.dtype).max:.6g} (larger values become inf)"
    raise NonFiniteError(
        f"output tensor '{name}' has {describe_nonfinite(t)} {where}; {OPT_IN} write them anyway"
    )


@contextmanager
def numerical_errors(what: str) -> Iterator[None]:
    """Re-raise torch's linear-algebra failures (e.g. an SVD of NaN / inf values, which only
    ``--allow-nonfinite`` lets through) as a MergeValidationError naming ``what``."""
    try:
        yield
    except torch.linalg.LinAlgError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MergeValidationError(f"{what}: {first}") from None


class FiniteReader:
    """A `CheckpointReader` whose `read` refuses tensors with NaN / ±inf values.

    Every other attribute is the wrapped reader's (``path``, ``names``, ``info``, ``close``,
    ``config`` of a LoRA fold, ...). ``source`` is the model reference named in errors (as the
    user wrote it).
    """

    def __init__(self, inner: CheckpointReader, source: str) -> None:
        self.inner = inner
        self.source = source

    def read(self, name: str) -> torch.Tensor:
        return check_input(self.inner.read(name), name, self.source)

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of a tensor, checked (`splice.io.mapped.read_rows`)."""
        return check_input(read_rows(self.inner, name, start, stop), name, self.source)

    @property
    def view(self) -> Callable[[str], AbstractContextManager[torch.Tensor]]:
        """The wrapped reader's mapped view, checked (AttributeError when it has none)."""
        inner_view = self.inner.view

        @contextmanager
        def checked(name: str) -> Iterator[torch.Tensor]:
            with inner_view(name) as t:
                yield check_input(t, name, self.source)

        return checked

    @property
    def view_rows(self) -> Callable[[str, int, int], AbstractContextManager[torch.Tensor]]:
        """The wrapped reader's mapped view of rows, checked (AttributeError when it has
        none)."""
        inner_view = self.inner.view_rows

        @contextmanager
        def checked(name: str, start: int, stop: int) -> Iterator[torch.Tensor]:
            with inner_view(name, start, stop) as t:
                yield check_input(t, name, self.source)

        return checked

    def __getattr__(self, attr: str) -> Any:
        if attr == "inner":  # not yet set: no recursion
            raise AttributeError(attr)
        return getattr(self.inner, attr)
