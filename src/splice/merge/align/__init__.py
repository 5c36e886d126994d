"""Permutation alignment of models that do not share a starting point: permutation specs,
weight matching (Git Re-Basin) and PLeaS (partial matching + least squares)."""

from splice.merge.align.pleas import pleas_merge
from splice.merge.align.spec import (
    AlignmentError,
    AxisRef,
    PermutationSpec,
    apply_permutation,
    llama_spec,
    mlp_spec,
)
from splice.merge.align.weight_matching import MatchResult, align, weight_matching

__all__ = [
    "AlignmentError",
    "AxisRef",
    "MatchResult",
    "PermutationSpec",
    "align",
    "apply_permutation",
    "llama_spec",
    "mlp_spec",
    "pleas_merge",
    "weight_matching",
]
