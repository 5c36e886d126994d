"""What the low-rank methods share: their parameter types and the default rank."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from splice.delta import LowRank

Rank = Annotated[int, Field(ge=1)]  # an output rank
Density = Annotated[float, Field(ge=0, le=1)]  # the fraction of entries kept


def default_rank(loras: list[LowRank], rank: int | None) -> int:
    """``rank``, else the largest input rank (PEFT's default for its *_svd combinations)."""
    return rank if rank is not None else max(f.rank for f in loras)
