"""Reading a tensor straight into another dtype, without a copy of its file bytes.

A plain `read` gives a fresh tensor of the file's dtype: the kernel copies the bytes from the
page cache into a new buffer (pread), and a merge computing in another dtype then converts
that buffer, a second pass over the same bytes. `read_as` skips the first pass where the
reader can map the file: `SafetensorsReader.view` maps the tensor's pages privately
(copy-on-write, so nothing can reach the file), the conversion reads them from the page cache
and writes the fresh tensor in the wanted dtype, and the mapping is dropped at once. Where no
conversion is needed the caller gets a plain `read`: methods modify their inputs in place,
and a private mapping would copy every written page anyway, one page fault at a time.

`read_rows` reads rows [start, stop) of a tensor (its first dimension), for callers that
stream one large tensor in row chunks (`splice.engine.chunks`): only those bytes are read
where the reader can (``reader.read_rows``; ``reader.rows_direct`` says so), else the whole
tensor is read and sliced. `read_rows_as` is `read_as` for rows: converting, it maps only
the rows' pages (``reader.view_rows``) and converts from them.

The digest (`input_digest`, for `--resume`) and the NaN / ±inf check (a `FiniteReader`) see
the tensor as stored, before the conversion, exactly as with a plain read.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from splice.io.base import CheckpointReader
from splice.io.scratch import empty
from splice.io.shard_record import input_digest, raw_bytes


def _converted(stored: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``stored.to(dtype)`` (the same kernel and bits), written into a scratch tensor: one
    of the current pool's reused storages while a merge runs (`splice.io.scratch`), so the
    conversion writes pages already in memory instead of faulting in fresh ones."""
    out = empty(stored.shape, dtype)
    return out.copy_(stored)


@contextlib.contextmanager
def _plain(reader: CheckpointReader, name: str) -> Iterator[torch.Tensor]:
    yield reader.read(name)


def stored_view(reader: CheckpointReader, name: str) -> contextlib.AbstractContextManager:
    """A context giving tensor ``name`` as stored, to read only and not keep: a mapped view
    where the reader has one (``reader.view``), else a plain read."""
    view = getattr(reader, "view", None)
    return view(name) if view is not None else _plain(reader, name)


def read_as(
    reader: CheckpointReader, name: str, dtype: torch.dtype | None, *, digest: bool
) -> tuple[torch.Tensor, str | None]:
    """Tensor ``name`` as a fresh tensor of ``dtype`` (None: the stored dtype), and the
    `input_digest` of its stored bytes when ``digest``."""
    if dtype is None or reader.info(name).dtype == dtype:
        t = reader.read(name)
        return t, input_digest(t) if digest else None
    with stored_view(reader, name) as stored:
        sha = input_digest(stored) if digest else None
        out = _converted(stored, dtype)
        del stored
    return out, sha


def read_rows(reader: CheckpointReader, name: str, start: int, stop: int) -> torch.Tensor:
    """Rows [start, stop) of tensor ``name`` as a fresh tensor of its stored dtype."""
    rows = getattr(reader, "read_rows", None)
    if rows is not None:
        return rows(name, start, stop)
    return reader.read(name)[start:stop].clone()


@contextlib.contextmanager
def _plain_rows(
    reader: CheckpointReader, name: str, start: int, stop: int
) -> Iterator[torch.Tensor]:
    yield read_rows(reader, name, start, stop)


def rows_view(
    reader: CheckpointReader, name: str, start: int, stop: int
) -> contextlib.AbstractContextManager:
    """A context giving rows [start, stop) of tensor ``name`` as stored, to read only and not
    keep: a mapped view of those rows where the reader has one (``reader.view_rows``), else
    `read_rows`."""
    view = getattr(reader, "view_rows", None)
    return view(name, start, stop) if view is not None else _plain_rows(reader, name, start, stop)


def read_rows_as(
    reader: CheckpointReader,
    name: str,
    start: int,
    stop: int,
    dtype: torch.dtype | None,
    hasher: Any = None,
) -> torch.Tensor:
    """Rows [start, stop) of tensor ``name`` as a fresh tensor of ``dtype`` (None: the stored
    dtype), their stored bytes fed to ``hasher`` (a running `input_hasher`) when one is
    given: converted from the mapped rows (`rows_view`), else a plain `read_rows`."""
    if dtype is None or reader.info(name).dtype == dtype:
        t = read_rows(reader, name, start, stop)
        if hasher is not None:
            hasher.update(raw_bytes(t))
        return t
    with rows_view(reader, name, start, stop) as stored:
        if hasher is not None:
            hasher.update(raw_bytes(stored))
        out = _converted(stored, dtype)
        del stored
    return out
