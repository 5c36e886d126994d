"""Freed tensor buffers go back to the system: glibc's mmap threshold fixed for a merge.

glibc serves an allocation at or above its mmap threshold with its own ``mmap`` and
returns it with ``munmap`` when freed; smaller ones come from the heap, whose freed
memory stays in the process. The threshold starts at 128 kB and, by default, rises to the
size of each mmapped block freed, up to 32 MB. A merge frees many buffers of a few to
30 MB (row chunks, per-tensor statistics); after the first, same-sized buffers come from
the heap and are kept, so the peak RSS grows with the tensors merged, not with
``--memory``: measured 2.5 GB for a row-chunked TIES merge of a 0.95B model (three
fine-tunes, ``--memory 1GB``, one thread); its statistics passes alone peak at 3.3 GB, or
0.43 GB with the threshold fixed at 1 MB.

Fixing the threshold (``mallopt(M_MMAP_THRESHOLD, 8 MB)``; setting it turns the rise off)
and the trim threshold with it gives 1.0-1.1 GB for that merge (0.6-0.75 GB when set from
process start by ``MALLOC_MMAP_THRESHOLD_``), at the cost of fresh pages for every buffer
of 8 MB or more. It is process-wide, so only the command line calls it, not the library.
No effect (False) outside glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from typing import Any

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers
M_MMAP_THRESHOLD = -3
THRESHOLD = 8 << 20


def _libc(function: str) -> Any:
    """The C library's ``function`` (a ctypes function), or None where there is none (not
    glibc: musl, macOS)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return getattr(ctypes.CDLL(name), function)
    except (OSError, AttributeError):
        return None


def release_large_buffers(threshold: int = THRESHOLD) -> bool:
    """Fix glibc's mmap threshold at ``threshold`` bytes, and its trim threshold (free
    memory at the top of a heap above which it is given back) at twice that, glibc's own
    ratio: the dynamic rise may already have raised it, up to 64 MB per arena. Whether it
    took effect."""
    mallopt = _libc("mallopt")
    if mallopt is None:
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, threshold)) and bool(
        mallopt(M_TRIM_THRESHOLD, 2 * threshold)
    )


def trim_heap() -> bool:
    """Give the heap's freed memory back to the system now (glibc's ``malloc_trim(0)``), so
    that the RSS after it counts what is in use, not what the allocator kept from earlier
    work. Whether anything was released; False outside glibc."""
    malloc_trim = _libc("malloc_trim")
    if malloc_trim is None:
        return False
    malloc_trim.argtypes = [ctypes.c_size_t]
    malloc_trim.restype = ctypes.c_int
    return bool(malloc_trim(0))
