"""Run a planned merge into a dict of tensors instead of a folder.

The same per-tensor job runner as `run_merge` (`splice.engine.execute`): each job reads its
inputs, merges them in the job's compute dtype with the whole-model statistics the method
asks for and the recipe's LiNeS post-step, and casts to the output dtype. So the tensors are
bit for bit those `run_merge` writes for the same plan (tested), and a search that scores
many candidate merges (`splice.engine.coefficient_search`) never writes one to disk.

Jobs run one after the other in the calling thread (a search holds the whole merged model
anyway); input digests, which only ``--resume`` needs, are not computed. Non-finite outputs
are refused unless the plan allows them, as the writer does.
"""

from __future__ import annotations

import os

import torch

from splice.engine.driver import Sources
from splice.engine.execute import _model_stat_rules, _Runner
from splice.engine.plan import MergePlan
from splice.errors import MergeValidationError


class _Unrecorded(Sources):
    """Inputs read without the per-tensor digests (a resume record has no use here)."""

    def read(
        self, ref: str | os.PathLike[str], name: str, record: dict[str, str] | None = None
    ) -> torch.Tensor:
        return super().read(ref, name, None)


def merge_to_memory(plan: MergePlan) -> dict[str, torch.Tensor]:
    """The merged model of ``plan`` as {output tensor name: tensor}, in the plan's order.
    The plan's readers stay open (the caller closes the plan)."""
    runner = _Runner(plan, _Unrecorded(plan.readers), {})
    runner.rules = _model_stat_rules(plan, threads=1, progress=False)
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
