"""Merge methods: pure tensor functions registered by name (see `registry`)."""

from splice.merge.registry import (
    MergeContext,
    MergeMethod,
    PerModel,
    all_methods,
    get_method,
    merge_method,
)
from splice.merge.stats import (
    DepthScale,
    KeepMask,
    KeepRule,
    RowPartials,
    StatRequest,
    TensorGram,
    TensorTopK,
    TopKThreshold,
)

__all__ = [
    "DepthScale",
    "KeepMask",
    "KeepRule",
    "MergeContext",
    "MergeMethod",
    "PerModel",
    "RowPartials",
    "StatRequest",
    "TensorGram",
    "TensorTopK",
    "TopKThreshold",
    "all_methods",
    "get_method",
    "merge_method",
]
