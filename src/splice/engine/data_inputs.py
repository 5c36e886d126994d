"""The statistics a data-aware method reads (fisher, regmean), given in a recipe.

    method: regmean
    models:
      - {model: ./expert_a, statistics: ./expert_a.gram.safetensors}
      - {model: ./expert_b, statistics: ./expert_b.gram.safetensors}

Each file is one model's statistics as written by `splice.merge.data_stats.save_statistics`
(collected by running the model on data in Python). They are read whole and checked when the
merge is planned, before any tensor is merged (`splice.merge.data_merge.check_statistics`:
names, shapes, finite values); each job then hands the method its tensor's statistics
(`DataStats`). Memory: all statistics stay loaded during the merge (Fisher: one tensor per
parameter and model, the models' size again; RegMean: one d_in x d_in Gram per linear layer
and model). A digest of every statistic enters the run's fingerprint, so ``--resume`` after
a statistics file changed starts over.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from torch import Tensor

from splice.errors import MergeValidationError
from splice.merge import MergeMethod
from splice.merge.data_merge import check_statistics
from splice.merge.data_stats import load_statistics
from splice.merge.stats import DataStatistic, DataStats
from splice.recipe.schema import Recipe


@dataclass
class DataInputs:
    request: DataStatistic
    stats: list[dict[str, Tensor]]  # per input model, in recipe order
    norms: tuple[float, ...]
    digest: str  # of every statistic, for the resume fingerprint

    def answer(self, names: list[str]) -> DataStats:
        """The statistics of the tensors ``names`` (one per input model)."""
        return DataStats(
            tuple(s.get(n) for s, n in zip(self.stats, names, strict=True)), self.norms
        )

    def numel(self, names: list[str]) -> int:
        return sum(s[n].numel() for s, n in zip(self.stats, names, strict=True) if n in s)


def load_data_inputs(
    recipe: Recipe, method: MergeMethod, shapes: dict[str, tuple[int, ...]]
) -> DataInputs | None:
    """The recipe's statistics checked against the floating tensors to merge (``shapes``),
    or None for a data-free method (which must name none)."""
    entries = recipe.models or []
    given = [i for i, e in enumerate(entries) if e.statistics is not None]
    if not method.needs_data:
        if given:
            raise MergeValidationError(
                f"models[{given[0]}].statistics: method '{method.name}' reads no statistics "
                "(only data-aware methods such as fisher and regmean do)"
            )
        return None
    if recipe.models is None:
        raise MergeValidationError(
            f"method '{method.name}' needs statistics per model: write the recipe with "
            "`models:` (not `slices:`), each with `statistics:`"
        )
    if len(method.data_statistics) != 1:
        raise MergeValidationError(f"method '{method.name}' needs several statistics")
    missing = [i for i, e in enumerate(entries) if e.statistics is None]
    if missing:
        e = entries[missing[0]]
        raise MergeValidationError(
            f"models[{missing[0]}] ({e.model}): method '{method.name}' needs "
            f"`statistics:` on every model, a safetensors file of its "
            f"{method.data_statistics[0]} statistics (splice.merge.data_stats)"
        )
    request = DataStatistic(method.data_statistics[0])
    stats = [load_statistics(e.statistics) for e in entries if e.statistics is not None]
    norms = tuple(check_statistics(request.kind, s, shapes, i) for i, s in enumerate(stats))
    h = hashlib.sha256()
    for s in stats:
        for name in sorted(s):
            t = s[name].contiguous()
            h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
            h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return DataInputs(request, stats, norms, h.hexdigest())
