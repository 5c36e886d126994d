"""Merge methods: pure tensor functions registered by name (see `registry`)."""

from splice.merge.registry import (
    KeepRule,
    MergeContext,
    MergeMethod,
    PerModel,
    TopKRequest,
    all_methods,
    get_method,
    merge_method,
)

__all__ = [
    "KeepRule",
    "MergeContext",
    "MergeMethod",
    "PerModel",
    "TopKRequest",
    "all_methods",
    "get_method",
    "merge_method",
]
