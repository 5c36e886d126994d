"""The running batch's KV cache: one left-padded `DynamicCache` that sequences join and leave.

Layout: every layer holds keys and values of shape (rows, kv heads, T, head dim); row r's
``lengths[r]`` real tokens are its LAST columns, the columns before them are padding (zeros),
and ``mask`` (rows × T, 1 = real) says which is which. A decoding step appends one column for
every row: the model gets ``attention_mask = [mask, 1]`` (so no row attends to padding) and
``position_ids = lengths`` (each row's own next position, as if it ran alone), exactly what
Hugging Face ``generate`` does for a left-padded batch.

- `join` puts other rows (a prefilled request, T' columns) under the batch: the shorter side
  is left-padded to max(T, T'). Cost: one copy of both caches.
- `keep` drops rows (finished requests), then the leading columns that are padding in every
  remaining row. Cost: one copy of the kept rows.
- a decoding step: `DynamicLayer.update` concatenates the new column, which copies the layer's
  cache (rows × T) once per step, the same as any Hugging Face decoding loop.

Only full-attention layers (`DynamicLayer`) are handled: sliding-window and linear-attention
layers keep another layout (`check_supported` refuses them).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


def check_supported(cache: DynamicCache) -> str | None:
    """Why ``cache`` (as built for the model) cannot be batched here, or None."""
    kinds = {type(layer).__name__ for layer in cache.layers}
    other = sorted(k for k in kinds if k != DynamicLayer.__name__)
    if other:
        return f"cache layers of type {', '.join(other)} (only full attention is supported)"
    return None


def _pad_left(x: Tensor, width: int) -> Tensor:
    """Left-pad the sequence axis (-2) of (rows, heads, T, dim) with zeros to ``width``."""
    return x if x.shape[-2] == width else F.pad(x, (0, 0, width - x.shape[-2], 0))


class KVBatch:
    """A left-padded batch cache (module docstring). Empty at first (no rows)."""

    def __init__(self) -> None:
        self.cache: DynamicCache | None = None
        self.mask: Tensor | None = None  # rows × T, long
        self.lengths: Tensor | None = None  # rows, long: real tokens per row

    @property
    def rows(self) -> int:
        return 0 if self.mask is None else int(self.mask.shape[0])

    @property
    def width(self) -> int:
        return 0 if self.mask is None else int(self.mask.shape[1])

    @staticmethod
    def of_prefill(cache: DynamicCache, mask: Tensor) -> KVBatch:
        """The batch of a prefill forward's ``cache`` (its inputs' ``mask``: rows × T)."""
        batch = KVBatch()
        batch.cache, batch.mask = cache, mask.long()
        batch.lengths = batch.mask.sum(dim=1)
        return batch

    def join(self, other: KVBatch) -> None:
        """Append ``other``'s rows after this batch's rows (left-padding the shorter)."""
        if other.rows == 0:
            return
        if self.rows == 0:
            self.cache, self.mask, self.lengths = other.cache, other.mask, other.lengths
            return
        assert self.cache is not None and other.cache is not None
        assert self.mask is not None and other.mask is not None
        width = max(self.width, other.width)
        for mine, theirs in zip(self.cache.layers, other.cache.layers, strict=True):
            mine.keys = torch.cat([_pad_left(mine.keys, width), _pad_left(theirs.keys, width)])
            mine.values = torch.cat(
                [_pad_left(mine.values, width), _pad_left(theirs.values, width)]
            )
        self.mask = torch.cat(
            [F.pad(self.mask, (width - self.width, 0)), F.pad(other.mask, (width - other.width, 0))]
        )
        self.lengths = torch.cat([self.lengths, other.lengths])

    def keep(self, rows: list[int]) -> None:
        """Keep only ``rows`` (in this order); drop the columns no kept row uses."""
        if self.rows == 0 or rows == list(range(self.rows)):
            return
        if not rows:
            self.cache = self.mask = self.lengths = None
            return
        assert self.cache is not None and self.mask is not None and self.lengths is not None
        index = torch.tensor(rows, dtype=torch.long, device=self.mask.device)
        mask = self.mask.index_select(0, index)
        lengths = self.lengths.index_select(0, index)
        first = self.width - int(lengths.max())  # leading columns that are all padding
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, index.to(layer.keys.device))[..., first:, :]
            layer.values = layer.values.index_select(0, index.to(layer.values.device))[
                ..., first:, :
            ]
        self.mask, self.lengths = mask[:, first:], lengths

    def step_inputs(self) -> tuple[Tensor, Tensor]:
        """(attention_mask rows × (T+1), position_ids rows × 1) for one new token per row."""
        assert self.mask is not None and self.lengths is not None
        ones = torch.ones_like(self.mask[:, :1])
        return torch.cat([self.mask, ones], dim=1), self.lengths.unsqueeze(1)

    def advance(self) -> None:
        """Record the column the step appended (call after the forward)."""
        assert self.mask is not None and self.lengths is not None
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        self.lengths = self.lengths + 1
