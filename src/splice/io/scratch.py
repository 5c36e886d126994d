"""Reused scratch buffers: large temporary tensors carved from buffers already paged in.

``splice merge`` fixes glibc's mmap threshold (`splice.engine.heap`) so that freed buffers
of 8 MB or more go back to the system and the peak RSS follows ``--memory``; the price is
that every large tensor a merge makes (an input converted to the compute dtype, a chunk's
magnitudes, the selection's (value, index) pairs) is fresh anonymous memory, each 4 KB page
faulted in and zeroed by the kernel on first touch: a third of the CPU time of a TIES merge.

A `ScratchPool` keeps the storages it hands out and gives them again once no tensor uses
them, so after the first jobs those tensors land on pages already in memory:

- ``empty(shape, dtype)`` returns a tensor (uninitialised, like ``torch.empty``) on the
  smallest free pooled storage that holds it and is at most ``RATIO`` times its size (a
  small tensor does not keep a much larger storage busy, which could then never be let
  go); with none, on a new storage of the size rounded up to ``GRAIN``, its own anonymous
  mapping (dropped, its pages go back to the system at once, whatever its size).
- A storage is free when the pool's own reference is its only one (torch's storage use
  count: every tensor on it, every view of one, a numpy array of one, holds a reference).
  Nothing is released by hand, so a tensor that outlives its job (returned, kept in a
  list) can never be overwritten: its storage is simply not free.
- What it holds follows what is in use. ``high`` is the most bytes of storages in use at
  one time so far; a new storage that would take the pool past it first drops free ones,
  least recently used first, so the pool never holds more than its tensors once needed
  at once (rounded to ``GRAIN``, and within ``RATIO``). A free storage is not dropped for
  being idle: the embedding job's large storages, idle while the layers run, serve the
  same-shaped lm_head job at the end (an age limit that dropped them made that job fault
  in ~250 MB again: 0.37B bfloat16 Model Stock, 269K -> 204K page faults, 3.7-3.8 -> 3.5 s;
  peak RSS unchanged, as ``high`` bounds what the pool holds either way). ``cap`` bounds
  it all: a storage that would pass it is not made, the tensor is a plain
  ``torch.empty`` outside the pool (today's behaviour), as is every request under
  ``min_bytes`` (1 MiB; glibc's heap serves those).

So the peak RSS stays where the merge's own tensors put it (``--memory``): measured on the
0.1B TIES merges 516-536 MB against 535-580 MB without the pool, 525-533 against 770-795 MB
for the whole-model trim (the pool's mappings leave no holes in glibc's heap); a large
tensor that goes through the pool after the first jobs costs no page faults
(docs/merge-performance.md, "What is left").

`installed(pool)` makes a pool the process's current one while a merge runs (every thread:
the read-ahead thread converts inputs, the workers compute); the module-level `empty` then
draws from it, and is ``torch.empty`` otherwise. Thread-safe: one lock around the choice of
a storage and the making of its tensor, so two threads never get the same free storage.
"""

from __future__ import annotations

import contextlib
import math
import mmap
import threading
from collections.abc import Iterator, Sequence

import torch

GRAIN = 1 << 20  # pooled storages are whole MiB, so chunks of nearby sizes share them
MIN_BYTES = 1 << 20  # smaller requests: glibc's heap (a mapping each would not pay)
RATIO = 4  # a request is served by a free storage of at most RATIO times its size (+ GRAIN)


def _mapped(size: int) -> torch.UntypedStorage:
    """A storage of ``size`` bytes on its own anonymous mapping (not glibc's heap, whatever
    the size: dropping it gives its pages back to the system at once)."""
    return torch.frombuffer(mmap.mmap(-1, size), dtype=torch.uint8).untyped_storage()


# torch's storage use count is a private binding (torch 2.13 has it); without it nothing is
# pooled and every request is a plain ``torch.empty``.
POOLABLE = hasattr(torch._C, "_storage_Use_Count")


def _use_count(storage: torch.UntypedStorage) -> int:
    """References to ``storage``'s memory: tensors, views, Python storage objects."""
    return torch._C._storage_Use_Count(storage._cdata)


class ScratchPool:
    """Storages handed out as tensors and handed out again once unused (module docstring)."""

    def __init__(self, cap: int, min_bytes: int | None = None) -> None:
        self.cap = cap
        self.min_bytes = MIN_BYTES if min_bytes is None else min_bytes
        self._storages: list[torch.UntypedStorage] = []
        self._lock = threading.Lock()
        self._clock = 0  # pooled requests so far
        self._last: dict[int, int] = {}  # id of a storage -> the request it last served
        self.held = 0  # bytes of the storages kept
        self.high = 0  # the most bytes of storages in use at once (with the one made)
        self.reused = 0  # tensors given on a storage kept from before
        self.made = 0  # storages made
        self.plain = 0  # tensors given outside the pool (too small, or over the cap)

    def empty(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised contiguous tensor of ``shape`` and ``dtype``, on a pooled
        storage when it is at least ``min_bytes`` and the cap allows."""
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes >= max(self.min_bytes, 1):  # (an empty tensor needs no storage)
            with self._lock:
                storage = self._take(nbytes)
                if storage is not None:  # the tensor made under the lock: no longer free
                    return torch.empty(0, dtype=dtype).set_(storage, 0, tuple(shape))
        with self._lock:
            self.plain += 1
        return torch.empty(tuple(shape), dtype=dtype)

    def _take(self, nbytes: int) -> torch.UntypedStorage | None:
        """The smallest free storage of at least ``nbytes``, else a new one (see the module
        docstring for what it drops first), else None. Under the lock."""
        self._clock += 1
        free = sorted((s for s in self._storages if _use_count(s) == 1), key=lambda s: s.nbytes())
        fits = [s for s in free if nbytes <= s.nbytes() <= RATIO * nbytes + GRAIN]
        if fits:
            self.reused += 1
            self._last[id(fits[0])] = self._clock
            return fits[0]
        size = -(-nbytes // GRAIN) * GRAIN
        busy = self.held - sum(s.nbytes() for s in free)
        self.high = max(self.high, busy + size)  # the most bytes in use at once
        for s in sorted(free, key=lambda s: self._last[id(s)]):  # least recently used first
            if self.held + size <= min(self.high, self.cap):
                break
            self._drop(s)
        if self.held + size > self.cap:
            return None
        storage = _mapped(size)
        self._storages.append(storage)
        self._last[id(storage)] = self._clock
        self.held += size
        self.made += 1
        return storage

    def _drop(self, storage: torch.UntypedStorage) -> None:
        self._storages = [s for s in self._storages if s is not storage]
        del self._last[id(storage)]
        self.held -= storage.nbytes()

    def clear(self) -> None:
        """Drop every free storage (those in use stay until their tensors are gone)."""
        with self._lock:
            for s in [s for s in self._storages if _use_count(s) == 1]:
                self._drop(s)


_current: ScratchPool | None = None
_install_lock = threading.Lock()


@contextlib.contextmanager
def installed(pool: ScratchPool | None) -> Iterator[ScratchPool | None]:
    """Make ``pool`` the current pool of the process (for `empty`) inside the block, unless
    one is already current (a merge inside a merge keeps the outer one) or torch lacks the
    use count (`POOLABLE`); None: no change.
    Its free storages are dropped when the block ends."""
    global _current
    with _install_lock:
        mine = pool is not None and _current is None and POOLABLE
        if mine:
            _current = pool
    try:
        yield _current
    finally:
        if mine:
            with _install_lock:
                _current = None
            assert pool is not None
            pool.clear()


def current() -> ScratchPool | None:
    """The pool `installed` now, or None."""
    return _current


def empty(
    shape: Sequence[int], dtype: torch.dtype, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """``torch.empty(shape, dtype=dtype, device=device)``, drawn from the current pool when
    one is installed and the device is the CPU."""
    pool = _current
    if pool is None or torch.device(device).type != "cpu":
        return torch.empty(tuple(shape), dtype=dtype, device=device)
    return pool.empty(shape, dtype)
