"""Whole-model statistics as typed requests: a method declares them, the engine answers.

A method that needs more than the tensor in hand declares requests (`merge_method(...,
model_stats=fn)`, ``fn(params) -> list of requests``); the engine answers them in its
passes and hands each tensor its answers in `MergeContext.model_stats`, keyed by the request
object itself (frozen dataclasses: equal requests are one key). No string keys, and the
engine imports no method.

- `TopKThreshold(model_index, density)`: the whole-model top-k magnitude trim (TIES,
  DARE-TIES, breadcrumbs, magnitude pruning with ``scope: model``). The engine finds, by two
  radix-selection passes over every merged tensor (`splice.engine.topk`), the `KeepRule` per
  tensor that keeps exactly round(density · N) entries over the whole model.
- `TensorTopK(model_index, density)`: the same trim within one tensor (``scope: tensor``),
  answered only for a tensor merged in row chunks (a `KeepRule` per chunk, from a
  statistics pre-pass over the chunks, or a `KeepMask` of the chunk's rows where the
  mergekit dialect's tie order needs the whole tensor); a method selects by itself when it
  is unanswered.
- `TensorGram(of_delta)`: the dot products between the tensor's vectors (the base and the
  models, or the task vectors) over the whole tensor, in float64 with per-row partials added
  in row order (`splice.merge.methods._row_gram`: the same bits in any row slices);
  answered only for a tensor merged in row chunks, from a pre-pass over the chunks (SLERP's
  norms and dot product, Model Stock's cosines); a method computes it from the whole tensor
  when it is unanswered.
- `RowPartials(name)`: the totals over the whole tensor of per-row float64 partials that
  the method computes itself from its inputs' rows (`MergeMethod.row_partials`: DARE's L1
  norms before and after its drop), added in row order; answered only for a tensor merged
  in row chunks, from a pre-pass calling ``row_partials`` on each chunk.
- `DepthScale(alpha, beta)`: LiNeS' depth scaling s(l) = α + β · l / (L − 1) (α outside
  layers or for L <= 1). Its inputs are the tensor's layer index and the model's layer count,
  which the engine puts in every context, so `MergeContext.stat` answers it directly; the
  engine applies it generically as the recipe's ``lines:`` post-step.
- `DataStatistic(kind)`: per-model statistics collected by running each model on data
  (`splice.merge.data_stats`): the diagonal Fisher of each parameter ("fisher") or the Gram
  matrix of each linear layer's inputs ("gram"). Answered per tensor with `DataStats`: by the
  engine from the recipe's per-model ``statistics:`` files (`splice.engine.data_inputs`), and
  by `splice.merge.data_merge.merge_with_statistics` from dicts or files.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor


@dataclass(frozen=True)
class KeepRule:
    """Which entries of one tensor survive a whole-model magnitude trim.

    Keep every entry with ``|x| > threshold`` plus the first ``tie_quota`` entries (in flat,
    row-major order) with ``|x| == threshold``. Magnitudes are compared in float32. The
    engine computes the rule so that exactly round(density * N) entries survive over the
    whole model (N = number of entries of all merged tensors).
    """

    threshold: float
    tie_quota: int


@dataclass(frozen=True, eq=False)
class KeepMask:
    """Which entries of some rows of a tensor survive a per-tensor trim selected over the
    whole tensor (mergekit's ties in torch's sort order, which no threshold rule repeats):
    the keep mask of those rows in flat order, packed 8 entries a byte (`numpy.packbits`,
    n/8 bytes)."""

    bits: np.ndarray
    count: int

    @staticmethod
    def pack(mask: Tensor) -> KeepMask:
        """The packed form of a bool mask (flattened)."""
        flat = mask.reshape(-1).cpu().numpy()
        return KeepMask(np.packbits(flat), flat.size)

    @property
    def nbytes(self) -> int:
        return int(self.bits.nbytes)

    def unpack(self, shape: Sequence[int], device: torch.device | str = "cpu") -> Tensor:
        """The bool mask, of ``shape`` (``count`` entries)."""
        flat = np.unpackbits(self.bits, count=self.count).view(np.bool_)
        return torch.from_numpy(flat).reshape(tuple(shape)).to(device)


@dataclass(frozen=True)
class TopKThreshold:
    """Request: the whole-model top-k of |tensors[model_index] − base| (float32), or of
    |tensors[model_index]| when ``of_delta`` is False, over every tensor the method merges;
    answered per tensor with a `KeepRule`."""

    model_index: int
    density: float
    of_delta: bool = True


@dataclass(frozen=True)
class TensorTopK:
    """Request: the top-k of |tensors[model_index] − base| (float32) within this tensor
    alone, k = `keep_count`(n, density, dialect) (a ``scope: tensor`` trim). Answered, with a
    `KeepRule` or a `KeepMask` for the rows in hand, only when the engine merges the tensor
    in row chunks
    (`splice.engine.chunks`); otherwise it is left unanswered and the method selects the
    entries itself from the whole tensor."""

    model_index: int
    density: float


@dataclass(frozen=True)
class TensorGram:
    """Request: the m × m Gram matrix G_ij = x_i · x_j over this whole tensor (float64, as
    `splice.merge.methods._row_gram` computes it) of the vectors (base, θ_1, …, θ_n), or with
    ``of_delta`` of the task vectors δ_i = θ_i − base taken in the compute dtype. Answered
    (a float64 tensor [m, m]) only when the engine merges the tensor in row chunks (a
    statistics pre-pass over the chunks, `splice.engine.chunks`); otherwise it is left
    unanswered and the method computes it from the whole tensor (the same bits)."""

    of_delta: bool


@dataclass(frozen=True)
class RowPartials:
    """Request: the sums over this whole tensor of the per-row float64 partials [rows, k]
    that the method's ``row_partials(base, tensors, ctx, params)`` gives for its inputs'
    rows (``ctx.flat_offset``: their first flat entry), added one at a time in row order
    (`splice.merge.methods._row_gram.RowOrderSum`). Answered (a float64 tensor [k]) only
    when the engine merges the tensor in row chunks (a pre-pass over the chunks); otherwise
    the method sums its own partials of the whole tensor (the same bits). ``name`` tells
    one method's requests apart."""

    name: str


@dataclass(frozen=True)
class DepthScale:
    """Request: LiNeS' depth scale of a tensor, s(l) = α + β · l / (L − 1)."""

    alpha: float
    beta: float

    def at(self, layer: int | None, num_layers: int | None) -> float:
        """s(l); α outside layers (``layer`` None) or for a model of at most one layer."""
        if layer is None or num_layers is None or num_layers <= 1:
            return self.alpha
        return self.alpha + self.beta * layer / (num_layers - 1)


DataKind = Literal["fisher", "gram"]


@dataclass(frozen=True)
class DataStatistic:
    """Request: each input model's data statistic for the tensor being merged (declared
    with `merge_method(..., data_statistics=[kind])`)."""

    kind: DataKind


@dataclass(frozen=True, eq=False)
class DataStats:
    """Answer to a `DataStatistic` for one tensor.

    ``per_model[i]``: model i's statistic for this tensor (the Fisher diagonal, same shape as
    the tensor; or the d_in x d_in Gram of the linear layer whose weight this is), None when
    the model has none for it. ``model_norms[i]``: the L2 norm of model i's whole statistic
    over every merged tensor (Fisher merging's per-model normalization).
    """

    per_model: tuple[Tensor | None, ...]
    model_norms: tuple[float, ...]


StatRequest = TopKThreshold | TensorTopK | TensorGram | RowPartials | DepthScale | DataStatistic
