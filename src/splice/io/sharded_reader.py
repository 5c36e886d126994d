"""A reader for Hugging Face sharded checkpoints: an index JSON plus shard files.

`model.safetensors.index.json` (safetensors shards) or `pytorch_model.bin.index.json`
(weights-only pickled shards) holds {"metadata": {...}, "weight_map": {tensor: shard file}}.
At open, every shard is opened (headers only for safetensors, a memory map for `.bin`) and the
index is checked against them: each shard file exists, is a plain file name inside the folder,
really lies inside the folder's allowed root once links are followed (`safe_paths`: a shard
linked out of the folder is refused; a Hugging Face cache snapshot's links into its blobs are
fine), is a regular file, and holds every tensor the index assigns to it. The index itself is
read through `splice.io.textfile.load_json` (a regular file of at most 100 MB) and may list at most
`MAX_TENSORS` tensors. Tensors a shard
holds but the index does not list are unreachable for Hugging Face loaders and are ignored here
too.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path

import torch

from splice.errors import CheckpointError
from splice.io.base import CheckpointReader, TensorInfo
from splice.io.mapped import read_rows, rows_view, stored_view
from splice.io.safe_paths import allowed_root, member, shown
from splice.io.safetensors_reader import MAX_TENSORS, SafetensorsReader
from splice.io.textfile import load_json
from splice.io.torch_reader import TorchReader

SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"


class ShardedReader:
    """One lazy view over all shards named by an HF index file."""

    def __init__(self, index_path: str | os.PathLike[str]) -> None:
        index_file = Path(index_path)
        self.path = str(index_file.parent)
        self.index_path = str(index_file)
        weight_map = _load_weight_map(index_file)
        opener: Callable[[str], CheckpointReader] = (
            TorchReader if index_file.name.endswith(".bin.index.json") else SafetensorsReader
        )

        shard_names = sorted(set(weight_map.values()))
        self._shards: dict[str, CheckpointReader] = {}
        self._where: dict[str, str] = {}
        try:
            root = allowed_root(index_file.parent)
            for shard in shard_names:
                shard_path = member(index_file.parent, shard, root)
                if shard_path is None:
                    raise CheckpointError(
                        f"{index_file}: lists shard {shown(shard)}, which does not exist in "
                        f"{index_file.parent}"
                    )
                self._shards[shard] = opener(str(shard_path))
            for name, shard in weight_map.items():
                try:
                    self._shards[shard].info(name)
                except KeyError:
                    raise CheckpointError(
                        f"{index_file}: tensor {shown(name)} is mapped to shard {shown(shard)}, "
                        "but that shard does not contain it"
                    ) from None
            listed = set(weight_map)
            self._order = [
                n for shard in shard_names for n in self._shards[shard].names() if n in listed
            ]
            self._where = {n: weight_map[n] for n in self._order}
        except BaseException:
            self.close()
            raise

    def names(self) -> list[str]:
        """Tensor names: shards in file-name order, each in its own file order."""
        return list(self._order)

    def info(self, name: str) -> TensorInfo:
        """Shape and dtype from the shard's header; KeyError for unknown names."""
        return self._shards[self._where[name]].info(name)

    def read(self, name: str) -> torch.Tensor:
        """Read one tensor from its shard."""
        return self._shards[self._where[name]].read(name)

    @property
    def rows_direct(self) -> bool:
        """Whether `read_rows` reads only the rows' bytes (every shard can)."""
        return all(getattr(r, "rows_direct", False) for r in self._shards.values())

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of one tensor from its shard (`splice.io.mapped.read_rows`)."""
        return read_rows(self._shards[self._where[name]], name, start, stop)

    def view(self, name: str) -> contextlib.AbstractContextManager[torch.Tensor]:
        """A mapped view of one tensor in its shard (`SafetensorsReader.view`; a plain read for
        a shard that cannot be mapped)."""
        return stored_view(self._shards[self._where[name]], name)

    def view_rows(
        self, name: str, start: int, stop: int
    ) -> contextlib.AbstractContextManager[torch.Tensor]:
        """A mapped view of rows [start, stop) of one tensor in its shard (`rows_view`)."""
        return rows_view(self._shards[self._where[name]], name, start, stop)

    def close(self) -> None:
        """Close every shard."""
        for reader in self._shards.values():
            reader.close()


def _load_weight_map(index_file: Path) -> dict[str, str]:
    index = load_json(index_file, CheckpointError)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(
            f"{index_file}: has no 'weight_map' object mapping tensor names to shard files"
        )
    if len(weight_map) > MAX_TENSORS:
        raise CheckpointError(
            f"{index_file}: the weight_map lists {len(weight_map)} tensors; at most "
            f"{MAX_TENSORS} are accepted"
        )
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or not shard:
            raise CheckpointError(f"{index_file}: weight_map[{shown(name)}] is not a file name")
        if shard != os.path.basename(shard) or shard in (".", ".."):
            raise CheckpointError(
                f"{index_file}: weight_map[{shown(name)}] = {shown(shard)} is not a plain file "
                "name in the checkpoint folder"
            )
    return weight_map
