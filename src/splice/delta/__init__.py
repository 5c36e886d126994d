"""`splice.delta`: the delta types every adaptation is expressed in (see `base.py`)."""

from splice.delta._common import DeltaOps
from splice.delta.base import (
    Delta,
    DeltaError,
    apply_delta,
    check_factor,
    delta_from_tensors,
    delta_type,
    delta_types,
    to_tensors,
)
from splice.delta.dense import Dense
from splice.delta.folded import Folded, folded_transform
from splice.delta.low_rank import LowRank, factor_svd, truncate_dense, truncate_factors
from splice.delta.sparse import Sparse, sparsify
from splice.delta.ternary import Ternary, ternarize

__all__ = [
    "Delta",
    "DeltaError",
    "DeltaOps",
    "Dense",
    "Folded",
    "LowRank",
    "Sparse",
    "Ternary",
    "apply_delta",
    "check_factor",
    "delta_from_tensors",
    "delta_type",
    "delta_types",
    "factor_svd",
    "folded_transform",
    "sparsify",
    "ternarize",
    "to_tensors",
    "truncate_dense",
    "truncate_factors",
]
