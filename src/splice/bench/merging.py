"""Merge expert backbones through the real engine: a native recipe, plan, run, read back.

Each (method, parameters) becomes a native-dialect recipe (``method:``, splice's paper
defaults) over the cached backbone folders, computed in float32, planned and run by
`splice.engine` into a temporary folder (a single shard), read back into memory and
deleted. MiniLM's backbone is ~90 MB, so the disk round trip costs well under a second
and the bench exercises exactly what ``splice merge`` does.

A low-rank method (``lora:NAME``) takes the LoRA experts' adapter folders instead and runs
the recipe path `splice merge` takes for adapters (`splice.lora_merge.merge_low_rank_recipe`):
the merged LoRA adapter is written, then read back folded into the base (`BASE+ADAPTER`),
so its merge time includes the fold, as a dense method's includes its read-back.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from splice.bench.backbone import State
from splice.bench.experts import ADAPTER_DIR
from splice.engine import plan_merge, run_merge
from splice.lora_merge import merge_low_rank_recipe
from splice.merge import get_method
from splice.recipe.schema import parse_recipe
from splice.reference import open_checkpoint


def make_recipe(
    method: str,
    params: dict[str, Any],
    base: Path,
    experts: list[Path],
    seed: int,
    statistics: list[Path] | None = None,
) -> dict[str, Any]:
    """The native recipe: the base (for methods that take one), the experts in task order
    (a low-rank method: their adapter folders), each with its ``statistics:`` file when
    given (the data-aware methods: `splice merge`'s per-model statistics)."""
    low_rank = get_method(method).representation == "low_rank"
    models = [{"model": str(p / ADAPTER_DIR if low_rank else p)} for p in experts]
    if statistics is not None:
        for m, s in zip(models, statistics, strict=True):
            m["statistics"] = str(s)
    recipe: dict[str, Any] = {
        "method": method,
        "models": models,
        "parameters": dict(params),
        "dtype": "float32",
        "seed": seed,
    }
    if get_method(method).needs_base:
        recipe["base_model"] = str(base)
    return recipe


def merge_backbones(
    method: str,
    params: dict[str, Any],
    base: Path,
    experts: list[Path],
    *,
    seed: int = 0,
    work_dir: Path | None = None,
    statistics: list[Path] | None = None,
) -> tuple[State, float]:
    """(merged backbone tensors, seconds spent merging); ``statistics``: one file per expert
    for a data-aware method (fisher, regmean, fisher_graft)."""
    recipe = make_recipe(method, params, base, experts, seed, statistics)
    start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="splice-bench-merge-", dir=work_dir))
    try:
        parsed = parse_recipe(recipe, f"bench:{method}")
        merged = str(tmp / "merged")
        if get_method(method).representation == "low_rank":
            merge_low_rank_recipe(parsed, tmp / "adapter")
            merged = f"{base}+{tmp / 'adapter'}"
        else:
            plan = plan_merge(parsed)
            try:
                run_merge(plan, tmp / "merged", shard_bytes=1 << 40, progress=False)
            finally:
                plan.close()
        reader = open_checkpoint(merged)
        try:
            state = {n: reader.read(n).clone() for n in reader.names()}
        finally:
            reader.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {k: v.to(torch.float32) if v.is_floating_point() else v for k, v in state.items()}, (
        time.perf_counter() - start
    )
