"""A lazy reader for one `.safetensors` file, with its header validated at open.

The format: 8 bytes little-endian header size N, N bytes of JSON header, then the data region.
The header maps each tensor name to {"dtype", "shape", "data_offsets": [begin, end]} (offsets
relative to the data region) and may carry a `__metadata__` dict of strings.

Everything that can be checked from the header is checked when the file is opened, so a
truncated or corrupt file fails before any heavy work: the header size, the JSON, the dtypes,
the shapes, each tensor's byte length against shape × itemsize, each range against the file
size, and overlaps between ranges. Gaps between tensors are tolerated (they waste bytes but
cannot make a read wrong).

`read(name)` reads that tensor's bytes, and nothing else, with `os.preadv` into a fresh
buffer: no mmap, so the resident memory is the tensors the caller holds, not the file's pages.
The file descriptor stays open until `close()`; reads from several threads are safe.
"""

from __future__ import annotations

import json
import os
import stat
import sys
from typing import Any

import torch

from splice.errors import CheckpointError
from splice.io.base import TensorInfo
from splice.io.dtypes import SAFETENSORS_TO_TORCH, itemsize

MAX_HEADER_BYTES = 100_000_000
"""The same upper bound the official `safetensors` library puts on a header."""

_PREADV_CHUNK = 1 << 30
"""Read at most this many bytes per system call (Linux caps one read near 2 GiB)."""


def read_exact(fd: int, buf: bytearray | memoryview, offset: int, path: str) -> None:
    """Fill `buf` from the file at `offset`; CheckpointError if the file ends first."""
    view = memoryview(buf).cast("B")
    done = 0
    while done < len(view):
        chunk = view[done : done + _PREADV_CHUNK]
        n = os.preadv(fd, [chunk], offset + done)
        if n == 0:
            raise CheckpointError(
                f"{path}: file ended after {offset + done} bytes while reading "
                f"{len(view)} bytes at offset {offset} (truncated?)"
            )
        done += n


class SafetensorsReader:
    """Lazy, validated access to the tensors of one safetensors file."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        if sys.byteorder != "little":
            raise CheckpointError(
                f"{self.path}: safetensors data is little-endian and this machine is not; "
                "big-endian hosts are not supported"
            )
        try:
            self._fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            raise CheckpointError(f"{self.path} does not exist") from None
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot open: {e.strerror}") from None
        try:
            if not stat.S_ISREG(os.fstat(self._fd).st_mode):
                raise CheckpointError(f"{self.path} is not a regular file (a folder?)")
            self._infos, self._ranges, self.metadata = self._parse_header()
        except BaseException:
            os.close(self._fd)
            self._fd = -1
            raise
        self._order = sorted(self._infos, key=lambda n: (self._ranges[n][0], n))

    def _parse_header(
        self,
    ) -> tuple[dict[str, TensorInfo], dict[str, tuple[int, int]], dict[str, str]]:
        """Read and validate the header; return infos, absolute byte ranges and metadata."""
        p = self.path
        file_size = os.fstat(self._fd).st_size
        if file_size < 8:
            raise CheckpointError(
                f"{p}: {file_size} bytes is too short for a safetensors file "
                "(no 8-byte header size; truncated?)"
            )
        size_bytes = bytearray(8)
        read_exact(self._fd, size_bytes, 0, p)
        header_size = int.from_bytes(size_bytes, "little")
        if header_size == 0 or header_size > MAX_HEADER_BYTES:
            raise CheckpointError(
                f"{p}: header size {header_size} is not plausible (expected 1..{MAX_HEADER_BYTES} "
                "bytes); not a safetensors file, or a corrupt one"
            )
        if 8 + header_size > file_size:
            raise CheckpointError(
                f"{p}: header size {header_size} is larger than the file ({file_size} bytes); "
                "the file is truncated or corrupt"
            )
        raw = bytearray(header_size)
        read_exact(self._fd, raw, 8, p)
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{p}: the header is not valid JSON ({e})") from None
        if not isinstance(header, dict):
            raise CheckpointError(
                f"{p}: the header is JSON {type(header).__name__}, expected an object"
            )

        metadata = _check_metadata(p, header.pop("__metadata__", None))
        data_start = 8 + header_size
        data_size = file_size - data_start
        infos: dict[str, TensorInfo] = {}
        ranges: dict[str, tuple[int, int]] = {}
        for name, entry in header.items():
            info, begin, end = _check_entry(p, name, entry)
            if end > data_size:
                raise CheckpointError(
                    f"{p}: tensor '{name}' data_offsets [{begin}, {end}] run past the end of the "
                    f"data region ({data_size} bytes); the file is truncated or corrupt"
                )
            infos[name] = info
            ranges[name] = (data_start + begin, data_start + end)

        previous: tuple[str, int] | None = None
        for name in sorted(ranges, key=lambda n: ranges[n]):
            begin, end = ranges[name]
            if begin == end:
                continue
            if previous is not None and begin < previous[1]:
                raise CheckpointError(
                    f"{p}: tensors '{previous[0]}' and '{name}' have overlapping data_offsets"
                )
            previous = (name, end)
        return infos, ranges, metadata

    def names(self) -> list[str]:
        """Tensor names in the order of their data in the file."""
        return list(self._order)

    def info(self, name: str) -> TensorInfo:
        """Shape and dtype from the header; KeyError for unknown names."""
        return self._infos[name]

    def byte_range(self, name: str) -> tuple[int, int]:
        """Absolute [begin, end) byte range of the tensor's data in the file."""
        return self._ranges[name]

    def read(self, name: str) -> torch.Tensor:
        """Read exactly this tensor's bytes into a fresh, writable CPU tensor."""
        info = self._infos[name]
        if self._fd < 0:
            raise CheckpointError(f"{self.path}: read('{name}') after close()")
        begin, end = self._ranges[name]
        if begin == end:
            return torch.empty(info.shape, dtype=info.dtype)
        buf = bytearray(end - begin)
        read_exact(self._fd, buf, begin, self.path)
        flat = torch.frombuffer(buf, dtype=torch.uint8)
        return flat.view(info.dtype).reshape(info.shape)

    def close(self) -> None:
        """Close the file descriptor; further reads fail."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> SafetensorsReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        fd = getattr(self, "_fd", -1)
        if fd >= 0:
            os.close(fd)


def _check_metadata(path: str, metadata: Any) -> dict[str, str]:
    if metadata is None:
        return {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise CheckpointError(f"{path}: __metadata__ must be an object of string to string")
    return dict(metadata)


def _check_entry(path: str, name: str, entry: Any) -> tuple[TensorInfo, int, int]:
    """Validate one header entry; return its info and relative [begin, end)."""
    where = f"{path}: tensor '{name}'"
    if not isinstance(entry, dict):
        raise CheckpointError(f"{where}: header entry is not an object")
    missing = {"dtype", "shape", "data_offsets"} - entry.keys()
    if missing:
        raise CheckpointError(f"{where}: header entry lacks {sorted(missing)}")
    dtype_name = entry["dtype"]
    if dtype_name not in SAFETENSORS_TO_TORCH:
        known = ", ".join(SAFETENSORS_TO_TORCH)
        raise CheckpointError(f"{where}: unknown dtype {dtype_name!r} (known: {known})")
    dtype = SAFETENSORS_TO_TORCH[dtype_name]
    shape = entry["shape"]
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise CheckpointError(f"{where}: shape {shape!r} is not a list of non-negative integers")
    offsets = entry["data_offsets"]
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(o) is int and o >= 0 for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise CheckpointError(
            f"{where}: data_offsets {offsets!r} are not two non-negative integers [begin, end] "
            "with begin <= end"
        )
    info = TensorInfo(name=name, shape=tuple(shape), dtype=dtype)
    begin, end = offsets
    expected = info.numel * itemsize(dtype)
    if end - begin != expected:
        raise CheckpointError(
            f"{where}: data_offsets [{begin}, {end}] hold {end - begin} bytes, but shape "
            f"{list(shape)} of {dtype_name} needs {expected}"
        )
    return info, begin, end
