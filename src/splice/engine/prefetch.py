"""Reading ahead: the inputs of admitted steps, read on one reader thread in step order.

The streaming driver admits a step when the memory budget has room for its estimated cost
(which includes its inputs), then hands the step's reads to the `Prefetcher` and the step
itself to the compute pool. The reader thread reads (and converts, hashes and checks) the
inputs of the admitted steps one after another, in admission order, while the workers
compute earlier steps and write their outputs; a step then takes its tensors from the
prefetcher instead of reading them. So reading overlaps computing and writing, and since a
step's reads are scheduled only once the step is admitted, everything read ahead is inside the
budget: the driver's bound (estimated bytes in flight <= ``memory_budget``) holds with
prefetching as without.

Besides whole tensors, a step may schedule a `Call`: a function run on the reader thread,
such as the rows of one chunk of a job merged in row chunks (`splice.engine.chunks`), which
schedules its next chunk's rows while it merges the current one. The budget covers these
too: the step's estimated cost counts the chunk read ahead.

Each read is keyed by (step, reference, tensor name, dtype), a call by (step, its key); a
step takes only its own (a tensor read twice by one step, or by two steps, is read twice:
every step gets fresh tensors it may modify in place). What a step does not take is
dropped when it ends (cancelled if not yet started, else its result let go), and
everything still queued when the run ends (an error) is cancelled.
"""

from __future__ import annotations

import threading
from collections import defaultdict, deque
from collections.abc import Callable, Hashable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

Read = tuple[str, str, torch.dtype | None]  # (reference, tensor name, dtype to convert to)
Result = tuple[torch.Tensor, str | None]  # the tensor and the digest of its stored bytes


@dataclass(frozen=True, eq=False)
class Call:
    """A read that is not one whole tensor: ``fn()`` on the reader thread, taken by ``key``
    (unique within its step)."""

    key: Hashable
    fn: Callable[[], Any]


_Key = tuple[int, Hashable]  # (step, (reference, tensor name, dtype) or a call's key)


class Prefetcher:
    """Reads scheduled per step on one thread, in the order scheduled."""

    def __init__(self, read: Callable[[str, str, torch.dtype | None], Result]) -> None:
        self._read = read
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="splice-read")
        self._queued: dict[_Key, deque[Future[Any]]] = defaultdict(deque)
        self._lock = threading.Lock()

    def schedule(self, step: int, reads: Iterable[Read | Call]) -> None:
        """Queue the reads (and calls) of ``step`` behind every one scheduled before."""
        for read in reads:
            if isinstance(read, Call):
                key: Hashable = read.key
                future = self._pool.submit(read.fn)
            else:
                key = read
                future = self._pool.submit(self._read, *read)
            with self._lock:
                self._queued[(step, key)].append(future)

    def take(self, step: int, key: Hashable) -> Future[Any] | None:
        """The future of the read ((reference, name, dtype)) or call (its key) scheduled for
        ``step``, or None when none was; its ``result()`` waits for it and re-raises a
        failed read's error."""
        with self._lock:
            queue = self._queued.get((step, key))
            if not queue:
                return None
            return queue.popleft()

    def drop(self, step: int) -> None:
        """Forget the reads of ``step`` it did not take (cancelled if not yet started)."""
        with self._lock:
            keys = [k for k in self._queued if k[0] == step]
            futures = [f for k in keys for f in self._queued.pop(k)]
        for f in futures:
            f.cancel()

    def close(self) -> None:
        """Cancel every queued read and stop the reader thread."""
        with self._lock:
            futures = [f for q in self._queued.values() for f in q]
            self._queued.clear()
        for f in futures:
            f.cancel()
        self._pool.shutdown(wait=True, cancel_futures=True)
