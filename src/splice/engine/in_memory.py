"""Run a planned merge into a dict of tensors instead of a folder.

The same per-tensor job runner as `run_merge` (`splice.engine.execute`): each job reads its
inputs, merges them in the job's compute dtype with the whole-model statistics the method
asks for and the recipe's LiNeS post-step, and casts to the output dtype. So the tensors are
bit for bit those `run_merge` writes for the same plan (tested), and a search that scores
many candidate merges (`splice.engine.coefficient_search`) never writes one to disk.

Jobs run one after the other in the calling thread (a search holds the whole merged model
anyway), with torch's intra-op thread count set as `splice merge` sets it by default (so a
reduction whose rounding could depend on it rounds the same); input digests, which only
``--resume`` needs, are not computed. Non-finite outputs are refused unless the plan allows
them, as the writer does.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from splice.engine.driver import Sources
from splice.engine.execute import (
    _model_stat_rules,
    _Runner,
    default_job_threads,
    torch_threads_per_job,
)
from splice.engine.plan import MergePlan
from splice.engine.resume_check import Rules
from splice.errors import MergeValidationError


class _Unrecorded(Sources):
    """Inputs read without the per-tensor digests (a resume record has no use here)."""

    def read(
        self,
        ref: str | os.PathLike[str],
        name: str,
        record: dict[str, str] | None = None,
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        return super().read(ref, name, None, dtype)


def merge_to_memory(
    plan: MergePlan, rules_cache: dict[Any, Rules] | None = None
) -> dict[str, torch.Tensor]:
    """The merged model of ``plan`` as {output tensor name: tensor}, in the plan's order.
    The plan's readers stay open (the caller closes the plan).

    ``rules_cache`` keeps the whole-model top-k thresholds (TIES / magnitude trims with
    ``scope: model``) between calls on the same inputs: they depend only on the requests
    (model, density), the planned tensors and the input tensors, not on weights or λ, so a
    search that changes only those computes them once."""
    old_threads = torch.get_num_threads()
    torch.set_num_threads(torch_threads_per_job(default_job_threads()))
    try:
        return _merge(plan, rules_cache)
    finally:
        torch.set_num_threads(old_threads)


def _merge(plan: MergePlan, rules_cache: dict[Any, Rules] | None) -> dict[str, torch.Tensor]:
    runner = _Runner(plan, _Unrecorded(plan.readers), {})
    key = (
        tuple(plan.stat_requests),
        tuple((j.out.name, tuple((s.ref, s.name) for s in j.sources)) for j in plan.jobs),
    )
    if rules_cache is not None and key in rules_cache:
        runner.rules = rules_cache[key]
    else:
        runner.rules = _model_stat_rules(plan, threads=1, progress=False, chunks={})[0]
        if rules_cache is not None:
            rules_cache[key] = runner.rules
    state: dict[str, torch.Tensor] = {}
    for index in range(len(plan.jobs)):
        for out in runner(index):
            t = out.tensor
            if (
                not plan.allow_nonfinite
                and t.is_floating_point()
                and not bool(torch.isfinite(t).all())
            ):
                raise MergeValidationError(
                    f"tensor '{out.name}': the merge gave NaN or inf values "
                    f"(method '{plan.method.name}')"
                )
            state[out.name] = t
    return state
