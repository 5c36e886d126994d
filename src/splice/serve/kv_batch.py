"""The running batch's KV cache: one left-padded `DynamicCache` that sequences join and leave.

Layout: every layer holds keys and values of shape (rows, kv heads, T, head dim); row r's
``lengths[r]`` real tokens are its LAST columns, the columns before them are padding (zeros),
and ``mask`` (rows × T, 1 = real) says which is which. A decoding step appends one column for
every row: the model gets ``attention_mask = [mask, 1]`` (so no row attends to padding) and
``position_ids = lengths`` (each row's own next position, as if it ran alone), exactly what
Hugging Face ``generate`` does for a left-padded batch.

The layers are `SpareColumnsLayer`s: keys and values are views of the first T columns of
buffers with spare columns, so a decoding step writes its new column in place instead of
concatenating (a plain `DynamicLayer` copies the layer's whole cache at every step). When
the spare columns run out the buffer grows by half (at least 64 columns): an amortised
O(1) copy per column.

- `join` puts other rows (a prefilled request, T' columns) under the batch: the shorter side
  is left-padded to max(T, T'). Cost: one copy of both caches into a new buffer.
- `keep` drops rows (finished requests), then the leading columns that are padding in every
  remaining row. Cost: one copy of the kept rows.

Only full-attention layers (`DynamicLayer`) are handled: sliding-window and linear-attention
layers keep another layout (`check_supported` refuses them).
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

MIN_SPARE = 64  # columns added at least when a buffer grows


def check_supported(cache: DynamicCache) -> str | None:
    """Why ``cache`` (as built for the model) cannot be batched here, or None."""
    kinds = {type(layer).__name__ for layer in cache.layers}
    other = sorted(k for k in kinds if k != DynamicLayer.__name__)
    if other:
        return f"cache layers of type {', '.join(other)} (only full attention is supported)"
    return None


def _spare(width: int) -> int:
    return max(MIN_SPARE, width // 2)


def _buffer(like: Tensor, rows: int, width: int) -> Tensor:
    """Zeros of shape (rows, heads, width + spare, dim)."""
    return like.new_zeros(rows, like.shape[1], width + _spare(width), like.shape[3])


class SpareColumnsLayer(DynamicLayer):
    """A full-attention cache layer whose keys / values are the first T columns of buffers
    with spare columns (module docstring); otherwise a `DynamicLayer`."""

    def __init__(self, keys_buffer: Tensor, values_buffer: Tensor, width: int) -> None:
        super().__init__()
        self._set(keys_buffer, values_buffer, width)

    def _set(self, keys_buffer: Tensor, values_buffer: Tensor, width: int) -> None:
        self.keys_buffer, self.values_buffer = keys_buffer, values_buffer
        self.keys = keys_buffer[:, :, :width]
        self.values = values_buffer[:, :, :width]
        self.device = keys_buffer.device
        self.is_initialized = True

    def update(
        self, key_states: Tensor, value_states: Tensor, *args, **kwargs
    ) -> tuple[Tensor, Tensor]:
        width, new = self.keys.shape[-2], key_states.shape[-2]
        if width + new > self.keys_buffer.shape[-2]:
            keys = _buffer(self.keys, self.keys.shape[0], width + new)
            values = _buffer(self.values, self.values.shape[0], width + new)
            keys[:, :, :width] = self.keys
            values[:, :, :width] = self.values
            self.keys_buffer, self.values_buffer = keys, values
        self.keys_buffer[:, :, width : width + new] = key_states
        self.values_buffer[:, :, width : width + new] = value_states
        self._set(self.keys_buffer, self.values_buffer, width + new)
        return self.keys, self.values


def _joined(parts: list[tuple[Tensor, Tensor]], width: int) -> SpareColumnsLayer:
    """One layer holding the (keys, values) ``parts`` one under the other, each right-aligned
    in ``width`` columns."""
    rows = sum(k.shape[0] for k, _ in parts)
    keys = _buffer(parts[0][0], rows, width)
    values = _buffer(parts[0][1], rows, width)
    row = 0
    for k, v in parts:
        n, t = k.shape[0], k.shape[-2]
        keys[row : row + n, :, width - t : width] = k
        values[row : row + n, :, width - t : width] = v
        row += n
    return SpareColumnsLayer(keys, values, width)


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
        """The batch of a prefill forward's ``cache`` (its inputs' ``mask``: rows × T; a row's
        real columns need not be contiguous: they are moved to the row's end). The
        padding columns are zeroed (whatever the model computed there never reaches a real
        token through the mask, but a NaN would: 0 · NaN in the attention's sum)."""
        padding = (mask == 0)[:, None, :, None]
        if bool(padding.any()):
            for layer in cache.layers:
                layer.keys = layer.keys.masked_fill(padding.to(layer.keys.device), 0)
                layer.values = layer.values.masked_fill(padding.to(layer.values.device), 0)
        lengths = mask.long().sum(dim=1, keepdim=True)
        slots = torch.arange(mask.shape[1], device=mask.device)
        if not bool((mask.long() == (slots >= mask.shape[1] - lengths).long()).all()):
            # real columns not all at the end (prompt / prefix tuning rows: prefix, virtual
            # tokens and input slots each left-padded): move each row's real columns to its
            # end, in order. Attention is a sum over key columns, the positions are in the
            # keys already: the order of the columns changes nothing.
            order = torch.argsort(mask.long(), dim=1, stable=True)  # padding first
            for layer in cache.layers:
                index = order[:, None, :, None].to(layer.keys.device)
                layer.keys = layer.keys.gather(2, index.expand_as(layer.keys))
                layer.values = layer.values.gather(2, index.expand_as(layer.values))
            mask = mask.gather(1, order)
        batch = KVBatch()
        batch.cache, batch.mask = cache, mask.long()
        batch.lengths = batch.mask.sum(dim=1)
        return batch

    def join(self, other: KVBatch) -> None:
        """Append ``other``'s rows after this batch's rows (left-padding the shorter)."""
        if other.rows == 0:
            return
        assert other.cache is not None and other.mask is not None and other.lengths is not None
        mine = self.cache.layers if self.cache is not None else [None] * len(other.cache.layers)
        width = max(self.width, other.width)
        layers = []
        for a, b in zip(mine, other.cache.layers, strict=True):
            parts = [(a.keys, a.values)] if a is not None else []
            layers.append(_joined([*parts, (b.keys, b.values)], width))
        masks = [other.mask] if self.mask is None else [self.mask, other.mask]
        self.mask = torch.cat([torch.nn.functional.pad(m, (width - m.shape[1], 0)) for m in masks])
        lengths = [other.lengths] if self.lengths is None else [self.lengths, other.lengths]
        self.lengths = torch.cat(lengths)
        self.cache = DynamicCache()
        self.cache.layers = layers

    def keep(self, rows: list[int]) -> None:
        """Keep only ``rows`` (in this order); drop the columns no kept row uses."""
        if self.rows == 0 or rows == list(range(self.rows)):
            return
        if not rows:
            self.cache = self.mask = self.lengths = None
            return
        assert self.cache is not None and self.mask is not None and self.lengths is not None
        index = torch.tensor(rows, dtype=torch.long, device=self.mask.device)
        lengths = self.lengths.index_select(0, index)
        first = self.width - int(lengths.max())  # leading columns that are all padding
        self.cache.layers = [
            _joined(
                [
                    (
                        layer.keys.index_select(0, index.to(layer.keys.device))[:, :, first:],
                        layer.values.index_select(0, index.to(layer.values.device))[:, :, first:],
                    )
                ],
                self.width - first,
            )
            for layer in self.cache.layers
        ]
        self.mask = self.mask.index_select(0, index)[:, first:]
        self.lengths = lengths

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
