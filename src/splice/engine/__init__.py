"""The streaming merge engine: plan a recipe into per-tensor jobs, then execute them."""

from splice.engine.execute import MergeReport, run_merge
from splice.engine.plan import MergePlan, TensorJob, plan_merge

__all__ = ["MergePlan", "MergeReport", "TensorJob", "plan_merge", "run_merge"]
