"""A lazy reader for one `.safetensors` file, with its header validated at open.

The format: 8 bytes little-endian header size N, N bytes of JSON header, then the data region.
The header maps each tensor name to {"dtype", "shape", "data_offsets": [begin, end]} (offsets
relative to the data region) and may carry a `__metadata__` dict of strings.

Everything that can be checked from the header is checked when the file is opened, so a
truncated or corrupt file fails before any heavy work: the header size, the JSON, the dtypes,
the shapes, each tensor's byte length against shape × itemsize, each range against the file
size, and overlaps between ranges. Gaps between tensors are tolerated (they waste bytes but
cannot make a read wrong). Limits: the header at most `MAX_HEADER_BYTES`, at most `MAX_TENSORS`
tensors; the checks are one pass plus one sort, so a header at the limits opens in seconds.
The file is opened only if it is a regular file (`safe_paths.open_regular`: a FIFO or device
named `*.safetensors` is an error, not a hang), and errors never quote its bytes.

`read(name)` reads that tensor's bytes, and nothing else, with `os.preadv` into a fresh
tensor (uninitialized: no zeroing pass before the read; while a merge runs, one of the scratch
pool's reused storages, `splice.io.scratch`, so the read lands in pages already in memory
instead of faulting in new ones): no long-lived mmap, so the resident memory is the tensors
the caller holds, not the file's pages. `view(name)` maps just that tensor's pages
(privately, copy-on-write) for the length of a `with` block, for callers that only read them
once (a conversion to another dtype, `splice.io.mapped`): no copy out of the page cache, and
the mapping is gone after the block.
The file descriptor stays open until `close()`; reads from several threads are safe.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import mmap
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch

from splice.errors import CheckpointError
from splice.io import scratch
from splice.io.base import TensorInfo
from splice.io.dtypes import SAFETENSORS_TO_TORCH, itemsize
from splice.io.safe_paths import open_regular, shown
from splice.io.textfile import decode_utf8, parse_json

MAX_HEADER_BYTES = 100_000_000
"""The same upper bound the official `safetensors` library puts on a header."""

MAX_TENSORS = 1_000_000
"""Most tensors accepted in one file (or one shard index): far above any published checkpoint
(the largest mixture-of-experts models list on the order of 10^5), low enough that a header
crafted to list millions of empty tensors fails at once instead of costing minutes and GBs."""

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
        self._fd = open_regular(self.path)
        try:
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
            # the value is not printed: it is 8 bytes of a file that may not be safetensors
            raise CheckpointError(
                f"{p}: header size is not plausible (the first 8 bytes must give 1.."
                f"{MAX_HEADER_BYTES}); not a safetensors file, or a corrupt one"
            )
        if 8 + header_size > file_size:
            raise CheckpointError(
                f"{p}: header size {header_size} is larger than the file ({file_size} bytes); "
                "the file is truncated or corrupt"
            )
        raw = bytearray(header_size)
        read_exact(self._fd, raw, 8, p)
        where = f"{p}: the header"
        header = parse_json(decode_utf8(bytes(raw), where, CheckpointError), where, CheckpointError)
        del raw
        if not isinstance(header, dict):
            raise CheckpointError(
                f"{p}: the header is JSON {type(header).__name__}, expected an object"
            )
        metadata = _check_metadata(p, header.pop("__metadata__", None))
        if len(header) > MAX_TENSORS:
            raise CheckpointError(
                f"{p}: the header lists {len(header)} tensors; at most {MAX_TENSORS} are "
                "accepted in one file"
            )

        data_start = 8 + header_size
        data_size = file_size - data_start
        infos: dict[str, TensorInfo] = {}
        ranges: dict[str, tuple[int, int]] = {}
        for name, entry in header.items():
            info, begin, end = _check_entry(p, name, entry)
            if end > data_size:
                raise CheckpointError(
                    f"{p}: tensor {shown(name)} data_offsets [{begin}, {end}] run past the end "
                    f"of the data region ({data_size} bytes); the file is truncated or corrupt"
                )
            infos[name] = info
            ranges[name] = (data_start + begin, data_start + end)
        _check_overlaps(p, ranges)
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
        return self._read_into(info.shape, info.dtype, begin, end - begin)

    def _read_into(
        self, shape: tuple[int, ...], dtype: torch.dtype, offset: int, nbytes: int
    ) -> torch.Tensor:
        """``nbytes`` at ``offset`` as a fresh tensor of ``shape`` and ``dtype`` (a scratch
        tensor: `splice.io.scratch`)."""
        out = scratch.empty(shape, dtype)
        read_exact(self._fd, out.reshape(-1).view(torch.uint8).numpy(), offset, self.path)
        return out

    rows_direct = True  # `read_rows` reads only the rows' bytes

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of tensor ``name`` (its first dimension) into a fresh tensor:
        only those bytes are read."""
        info, row, shape = self._row_span(name, start, stop, "read")
        if row == 0 or start == stop:
            return torch.empty(shape, dtype=info.dtype)
        return self._read_into(
            shape, info.dtype, self._ranges[name][0] + row * start, row * (stop - start)
        )

    def view(self, name: str) -> contextlib.AbstractContextManager[torch.Tensor]:
        """Tensor ``name`` over a private mapping of its pages, valid inside the block only:
        read it, do not keep it (writes would copy pages, never reach the file)."""
        info = self._infos[name]
        if self._fd < 0:
            raise CheckpointError(f"{self.path}: view('{name}') after close()")
        begin, end = self._ranges[name]
        return self._mapped(name, begin, end, info.shape, lambda: self.read(name))

    def view_rows(
        self, name: str, start: int, stop: int
    ) -> contextlib.AbstractContextManager[torch.Tensor]:
        """Rows [start, stop) of tensor ``name`` over a private mapping of their pages only,
        valid inside the block only (as `view`)."""
        _, row, shape = self._row_span(name, start, stop, "view")
        begin = self._ranges[name][0] + row * start
        return self._mapped(
            name,
            begin,
            begin + row * (stop - start),
            shape,
            lambda: self.read_rows(name, start, stop),
        )

    def _row_span(
        self, name: str, start: int, stop: int, op: str
    ) -> tuple[TensorInfo, int, tuple[int, ...]]:
        """Checks rows [start, stop) of ``name`` (open file, first dimension in range) and
        gives its info, the bytes a row and the rows' shape."""
        info = self._infos[name]
        if self._fd < 0:
            raise CheckpointError(f"{self.path}: {op}('{name}') after close()")
        if not info.shape or not 0 <= start <= stop <= info.shape[0]:
            raise ValueError(f"rows [{start}, {stop}) of '{name}' with shape {list(info.shape)}")
        row = info.nbytes // info.shape[0] if info.shape[0] else 0
        return info, row, (stop - start, *info.shape[1:])

    @contextlib.contextmanager
    def _mapped(
        self,
        name: str,
        begin: int,
        end: int,
        shape: tuple[int, ...],
        plain: Callable[[], torch.Tensor],
    ) -> Iterator[torch.Tensor]:
        """File bytes [begin, end) of tensor ``name`` as a tensor of ``shape`` over a private
        mapping (``plain()``, a read, where the file system cannot map)."""
        info = self._infos[name]
        if begin == end:
            yield torch.empty(shape, dtype=info.dtype)
            return
        start = begin - begin % mmap.ALLOCATIONGRANULARITY
        if os.fstat(self._fd).st_size < end:  # mapping past the end would SIGBUS on access
            raise CheckpointError(
                f"{self.path}: file ended before byte {end} of tensor '{name}' (truncated?)"
            )
        try:
            mapped = mmap.mmap(self._fd, end - start, access=mmap.ACCESS_COPY, offset=start)
        except OSError:  # a file system that cannot map files: a plain read
            yield plain()
            return
        try:
            flat = torch.frombuffer(mapped, dtype=torch.uint8, offset=begin - start)
            t = flat.view(info.dtype).reshape(shape)
            del flat
            yield t
            del t
        finally:
            with contextlib.suppress(BufferError):  # a view the caller kept: freed with it
                mapped.close()

    def close(self) -> None:
        """Close the file descriptor; further reads fail."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> SafetensorsReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self, _close: Any = os.close) -> None:
        fd = getattr(self, "_fd", -1)
        if fd >= 0:  # os.close bound at definition: the os module may be gone at exit
            _close(fd)


def _check_metadata(path: str, metadata: Any) -> dict[str, str]:
    if metadata is None:
        return {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise CheckpointError(f"{path}: __metadata__ must be an object of string to string")
    return dict(metadata)


def _check_overlaps(path: str, ranges: dict[str, tuple[int, int]]) -> None:
    """One sort, one pass: no two non-empty ranges may share a byte."""
    spans = sorted((begin, end, name) for name, (begin, end) in ranges.items() if begin != end)
    for (_, prev_end, prev), (begin, _, name) in itertools.pairwise(spans):
        if begin < prev_end:
            raise CheckpointError(
                f"{path}: tensors {shown(prev)} and {shown(name)} have overlapping data_offsets"
            )


_ITEMSIZE = {name: itemsize(dtype) for name, dtype in SAFETENSORS_TO_TORCH.items()}


def _check_entry(path: str, name: str, entry: Any) -> tuple[TensorInfo, int, int]:
    """Validate one header entry; return its info and relative [begin, end).

    Values read from the file appear in errors only through `shown` (escaped, shortened).
    """
    if not isinstance(entry, dict):
        raise CheckpointError(f"{path}: tensor {shown(name)}: header entry is not an object")
    if "dtype" not in entry or "shape" not in entry or "data_offsets" not in entry:
        missing = sorted({"dtype", "shape", "data_offsets"} - entry.keys())
        raise CheckpointError(f"{path}: tensor {shown(name)}: header entry lacks {missing}")
    dtype_name, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    size = _ITEMSIZE.get(dtype_name) if isinstance(dtype_name, str) else None
    if size is None:
        known = ", ".join(SAFETENSORS_TO_TORCH)
        raise CheckpointError(
            f"{path}: tensor {shown(name)}: unknown dtype {shown(dtype_name)} (known: {known})"
        )
    if type(shape) is not list or not all(type(d) is int and d >= 0 for d in shape):
        raise CheckpointError(
            f"{path}: tensor {shown(name)}: shape {shown(shape)} is not a list of non-negative "
            "integers"
        )
    if (
        type(offsets) is not list
        or len(offsets) != 2
        or type(offsets[0]) is not int
        or type(offsets[1]) is not int
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise CheckpointError(
            f"{path}: tensor {shown(name)}: data_offsets {shown(offsets)} are not two "
            "non-negative integers [begin, end] with begin <= end"
        )
    begin, end = offsets
    expected = math.prod(shape) * size
    if end - begin != expected:
        raise CheckpointError(
            f"{path}: tensor {shown(name)}: data_offsets [{begin}, {end}] hold {end - begin} "
            f"bytes, but shape {shown(shape)} of {dtype_name} needs {expected}"
        )
    info = TensorInfo(name=name, shape=tuple(shape), dtype=SAFETENSORS_TO_TORCH[dtype_name])
    return info, begin, end
