"""Continual merging: models arrive one at a time; the state is the merged model so far
plus a few numbers, so memory does not grow with the number of models merged."""

from splice.merge.continual.opcm import (
    OpcmState,
    opcm_projected_update,
    opcm_split_rank,
    projects,
)

__all__ = ["OpcmState", "opcm_projected_update", "opcm_split_rank", "projects"]
