"""Planning an output checkpoint's shards before any tensor is computed.

Every output tensor's name, shape and dtype is known up front, so each shard's safetensors
header and every tensor's byte offset can be fixed before the first byte of data exists;
writers then fill tensors in any order, from any thread.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from splice.io.base import TensorInfo
from splice.io.dtypes import itemsize, safetensors_name

SINGLE_SHARD_NAME = "model.safetensors"


@dataclass(frozen=True)
class ShardPlan:
    """One output shard: its file name, its tensors and their data byte ranges.

    `tensors` keeps the order given to `plan_shards`. `offsets[i]` is the [begin, end) range
    of `tensors[i]` relative to the start of the data region. Within a shard the data is laid
    out by element size, largest first, and in the given order among equal sizes (what the
    official safetensors writer does too): the ranges are contiguous, without holes, and every
    tensor starts at a multiple of its element size, so memory-mapping loaders get aligned
    tensors.
    """

    filename: str
    tensors: tuple[TensorInfo, ...]
    offsets: tuple[tuple[int, int], ...]

    @property
    def data_bytes(self) -> int:
        """Bytes of tensor data in this shard."""
        return sum(end - begin for begin, end in self.offsets)

    def header(self, metadata: dict[str, str]) -> bytes:
        """The shard's 8-byte size prefix plus JSON header, padded with spaces to 8 bytes."""
        entries: dict[str, object] = {}
        if metadata:
            entries["__metadata__"] = dict(metadata)
        for info, (begin, end) in sorted(
            zip(self.tensors, self.offsets), key=lambda item: item[1][0]
        ):
            entries[info.name] = {
                "dtype": safetensors_name(info.dtype),
                "shape": list(info.shape),
                "data_offsets": [begin, end],
            }
        body = json.dumps(entries, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        body += b" " * (-len(body) % 8)
        return len(body).to_bytes(8, "little") + body


def plan_shards(tensors: list[TensorInfo], max_shard_bytes: int) -> list[ShardPlan]:
    """Split `tensors`, in the given order, greedily into shards of at most `max_shard_bytes`.

    A shard is closed when the next tensor would push its data past the budget; a tensor
    larger than the budget gets a shard of its own. The budget counts tensor data only (as
    Hugging Face does), not the small JSON header. Files are named
    `model-00001-of-00003.safetensors`, or `model.safetensors` when one shard suffices; an
    empty tensor list gives one empty `model.safetensors`. ValueError on a budget below one
    byte, a duplicate name, or a dtype safetensors cannot store.
    """
    if max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes must be at least 1, got {max_shard_bytes}")
    seen: set[str] = set()
    groups: list[list[TensorInfo]] = [[]]
    used = 0
    for info in tensors:
        if info.name in seen:
            raise ValueError(f"tensor '{info.name}' appears twice in the output plan")
        seen.add(info.name)
        safetensors_name(info.dtype)
        if groups[-1] and used + info.nbytes > max_shard_bytes:
            groups.append([])
            used = 0
        groups[-1].append(info)
        used += info.nbytes

    count = len(groups)
    plans = []
    for i, group in enumerate(groups):
        name = SINGLE_SHARD_NAME if count == 1 else f"model-{i + 1:05d}-of-{count:05d}.safetensors"
        plans.append(ShardPlan(filename=name, tensors=tuple(group), offsets=_layout(group)))
    return plans


def _layout(group: list[TensorInfo]) -> tuple[tuple[int, int], ...]:
    """Contiguous byte ranges, larger element sizes first, stable among equal sizes."""
    order = sorted(range(len(group)), key=lambda i: -itemsize(group[i].dtype))
    ranges: list[tuple[int, int]] = [(0, 0)] * len(group)
    pos = 0
    for i in order:
        n = group[i].nbytes
        ranges[i] = (pos, pos + n)
        pos += n
    return tuple(ranges)
