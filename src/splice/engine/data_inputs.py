"""The statistics a data-aware method reads (fisher, regmean), given in a recipe.

    method: regmean
    models:
      - {model: ./expert_a, statistics: ./expert_a.gram.safetensors}
      - {model: ./expert_b, data: bbc_news}
      - {model: ./expert_c, data: {source: my.jsonl, max_examples: 256, batch_size: 16}}

A ``statistics:`` file is one model's statistics as written by `splice stats` or
`splice.merge.data_stats.save_statistics`. A ``data:`` entry collects them when the merge is
planned, exactly as ``splice stats KIND MODEL --data SOURCE ...`` would (the same options),
kept in memory and not written: the planner hands them to a collector
(`splice.train.statistics.collect_data_entries`, passed in by `splice merge`; the engine
runs no model), which checks every model's request and reads its data (sources, splits,
labels in the head), then runs the models one at a time. The model must be an HF folder (a
sequence classifier or a causal LM). Statistics are read whole and checked when the merge is
planned, before any tensor is merged (`splice.merge.data_merge.check_statistics`: names,
shapes, finite values); each job then hands the method its tensor's statistics
(`DataStats`). Memory: all statistics stay loaded during the merge (Fisher: one tensor per
parameter and model, the models' size again; RegMean: one d_in x d_in Gram per linear layer
and model). A digest of every statistic enters the run's fingerprint, so ``--resume`` after
a statistics file changed starts over.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from splice.errors import MergeValidationError
from splice.merge import MergeMethod
from splice.merge.data_merge import check_statistics
from splice.merge.data_stats import load_statistics
from splice.merge.stats import DataStatistic, DataStats
from splice.recipe.schema import ModelEntry, Recipe

# (the ``data:`` entries with their index, the statistic's kind) -> statistics per index
DataCollector = Callable[[list[tuple[int, ModelEntry]], str], dict[int, dict[str, Tensor]]]


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
    recipe: Recipe,
    method: MergeMethod,
    shapes: dict[str, tuple[int, ...]],
    *,
    collect: DataCollector | None = None,
) -> DataInputs | None:
    """The recipe's statistics checked against the floating tensors to merge (``shapes``),
    or None for a data-free method (which must name none). ``data:`` entries are handed to
    ``collect`` (`splice.train.statistics.collect_data_entries`; the engine runs no model)."""
    entries = recipe.models or []
    given = [(i, k) for i, e in enumerate(entries) for k in ("statistics", "data") if getattr(e, k)]
    if not method.needs_data:
        if given:
            raise MergeValidationError(
                f"models[{given[0][0]}].{given[0][1]}: method '{method.name}' reads no "
                "statistics (only data-aware methods such as fisher and regmean do)"
            )
        return None
    if recipe.models is None:
        raise MergeValidationError(
            f"method '{method.name}' needs statistics per model: write the recipe with "
            "`models:` (not `slices:`), each with `statistics:`"
        )
    if len(method.data_statistics) != 1:
        raise MergeValidationError(f"method '{method.name}' needs several statistics")
    missing = [i for i, e in enumerate(entries) if e.statistics is None and e.data is None]
    if missing:
        e = entries[missing[0]]
        raise MergeValidationError(
            f"models[{missing[0]}] ({e.model}): method '{method.name}' needs "
            f"`statistics:` (a safetensors file of its {method.data_statistics[0]} "
            "statistics, from `splice stats`) or `data:` (a task or file to collect them on) "
            "on every model"
        )
    request = DataStatistic(method.data_statistics[0])
    with_data = [(i, e) for i, e in enumerate(entries) if e.data is not None]
    collected: dict[int, dict[str, Tensor]] = {}
    if with_data:
        if collect is None:
            raise MergeValidationError(
                f"models[{with_data[0][0]}].data: this caller collects no statistics; pass "
                "collect=splice.train.statistics.collect_data_entries to plan_merge (as "
                "`splice merge` does) or give `statistics:` files"
            )
        collected = collect(with_data, request.kind)
    stats = [
        collected[i] if i in collected else load_statistics(str(e.statistics))
        for i, e in enumerate(entries)
    ]
    norms = tuple(check_statistics(request.kind, s, shapes, i) for i, s in enumerate(stats))
    h = hashlib.sha256()
    for s in stats:
        for name in sorted(s):
            t = s[name].contiguous()
            h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
            h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return DataInputs(request, stats, norms, h.hexdigest())
