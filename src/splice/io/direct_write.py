"""One output file written past the page cache (``O_DIRECT``) where the file system allows.

Why: a merge writes each output byte once and does not read it back. Through the page cache
every written page is first a page of RAM the kernel must find and zero, then written back
later; on a virtual machine that hands free memory back to its host (virtio-balloon free page
reporting, as on the machines the README's benchmarks ran on) each of those pages is also a
fault into the host, and writing 0.77 GB took 1.5-2.5 s buffered against 0.5-0.6 s with
``O_DIRECT`` (``dd bs=8M``, five seconds apart). For outputs larger than RAM a buffered write
also evicts the inputs the merge is still reading. The price: the finished output is not in
the page cache, so the first load of the merged model reads it from disk.

How: ``O_DIRECT`` needs the file offset, the length and the memory address aligned to the
device's logical block; `ALIGN` = 4096 covers 512-byte and 4 KiB devices and is the page
size. A tensor's bytes start anywhere in the file, so `DirectFile.pwrite` splits each write:

- the whole 4 KiB pages inside ``[offset, offset + n)`` are copied through a page-aligned
  bounce buffer (`BOUNCE_BYTES` per thread, reused; the copy is numpy's, which releases the
  GIL) and written on the ``O_DIRECT`` descriptor;
- the partial pages at either end, which the tensor shares with its neighbours or the
  header, are written on an ordinary descriptor of the same file.

A page is therefore written either only directly or only through the cache, never both, so
the two paths cannot overwrite each other's bytes; the shard's ``fsync`` flushes the cached
ends and the file's metadata. Writes whose whole-page part is below `MIN_DIRECT` bytes (norms,
biases, small files) go through the cache alone.

Fallback: where ``O_DIRECT`` does not exist (not Linux) or the file system refuses it (tmpfs
before Linux 6.6, some FUSE file systems: ``open`` or the first write fails with
``EINVAL``), the file is written through the cache, as before; nothing is reported, the
bytes are the same.
"""

from __future__ import annotations

import errno
import mmap
import os
import threading
from pathlib import Path

import numpy as np

from splice.errors import CheckpointError
from splice.io.output_folder import pwrite_all

__all__ = ["ALIGN", "BOUNCE_BYTES", "MIN_DIRECT", "DirectFile"]

ALIGN = 4096
BOUNCE_BYTES = 8 << 20
MIN_DIRECT = 256 << 10

_bounce = threading.local()


def _bounce_buffer() -> tuple[memoryview, np.ndarray]:
    """This thread's page-aligned bounce buffer (an anonymous mapping, made once)."""
    pair = getattr(_bounce, "pair", None)
    if pair is None or len(pair[0]) != BOUNCE_BYTES:
        region = mmap.mmap(-1, BOUNCE_BYTES)
        pair = (memoryview(region), np.frombuffer(region, dtype=np.uint8))
        _bounce.pair = pair
    return pair


class DirectFile:
    """An open output file: `pwrite` from any thread, ``O_DIRECT`` for whole pages where
    possible (module docstring), then `fsync` and `close`."""

    def __init__(self, path: Path, direct: bool = True) -> None:
        self.path = path
        try:
            self.fd = os.open(path, os.O_WRONLY)
        except OSError as e:
            raise CheckpointError(f"{path}: cannot open for writing: {e.strerror}") from e
        self.direct_fd = -1
        self._refused = False  # set once the file system refuses a direct write
        flag = getattr(os, "O_DIRECT", 0)
        if direct and flag:
            try:
                self.direct_fd = os.open(path, os.O_WRONLY | flag)
            except OSError:
                self.direct_fd = -1

    @property
    def is_direct(self) -> bool:
        """Whether whole pages still go past the page cache."""
        return self.direct_fd >= 0 and not self._refused

    def pwrite(self, data: memoryview, offset: int) -> None:
        """Write all of ``data`` (bytes) at ``offset``; CheckpointError on failure."""
        data = data.cast("B")
        n = len(data)
        start = -(-offset // ALIGN) * ALIGN
        end = (offset + n) // ALIGN * ALIGN
        if not self.is_direct or end - start < MIN_DIRECT:
            pwrite_all(self.fd, data, offset, self.path)
            return
        done = self._write_pages(data[start - offset : end - offset], start)
        if done < end - start:  # direct writes refused: the rest through the cache
            pwrite_all(self.fd, data[start - offset + done :], start + done, self.path)
        else:
            pwrite_all(self.fd, data[end - offset :], end, self.path)
        pwrite_all(self.fd, data[: start - offset], offset, self.path)

    def _write_pages(self, pages: memoryview, offset: int) -> int:
        """Write whole pages on the direct descriptor; how many bytes went (less than all
        only when the file system refused, after which this file writes through the cache)."""
        region, array = _bounce_buffer()
        source = np.frombuffer(pages, dtype=np.uint8)
        done = 0
        while done < len(pages):
            size = min(len(region), len(pages) - done)
            np.copyto(array[:size], source[done : done + size])
            sent = 0
            while sent < size:
                try:
                    sent += os.pwrite(self.direct_fd, region[sent:size], offset + done + sent)
                except OSError as e:
                    if e.errno != errno.EINVAL:
                        raise CheckpointError(f"{self.path}: write failed: {e.strerror}") from e
                    self._refused = True  # other threads may be mid-write on the descriptor
                    return done + sent - sent % ALIGN
            done += size
        return done

    def fsync(self) -> None:
        """Flush the cached pages and the metadata to disk (raises OSError)."""
        os.fsync(self.fd)

    def close(self) -> None:
        """Close both descriptors (idempotent)."""
        for name in ("direct_fd", "fd"):
            fd = getattr(self, name)
            if fd >= 0:
                setattr(self, name, -1)
                os.close(fd)
