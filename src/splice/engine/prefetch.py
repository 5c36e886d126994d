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

Each read is keyed by (step, reference, tensor name, dtype); a step takes only its own
(a tensor read twice by one step, or by two steps, is read twice: every step gets fresh
tensors it may modify in place). What a step does not take is dropped when it ends, and
everything still queued when the run ends (an error) is cancelled.
"""

from __future__ import annotations

import threading
from collections import defaultdict, deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor

import torch

Read = tuple[str, str, torch.dtype | None]  # (reference, tensor name, dtype to convert to)
Result = tuple[torch.Tensor, str | None]  # the tensor and the digest of its stored bytes
_Key = tuple[int, str, str, torch.dtype | None]


class Prefetcher:
    """Reads scheduled per step on one thread, in the order scheduled."""

    def __init__(self, read: Callable[[str, str, torch.dtype | None], Result]) -> None:
        self._read = read
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="splice-read")
        self._queued: dict[_Key, deque[Future[Result]]] = defaultdict(deque)
        self._lock = threading.Lock()

    def schedule(self, step: int, reads: Iterable[Read]) -> None:
        """Queue the reads of ``step`` behind every read scheduled before."""
        for ref, name, dtype in reads:
            future = self._pool.submit(self._read, ref, name, dtype)
            with self._lock:
                self._queued[(step, ref, name, dtype)].append(future)

    def take(self, step: int, ref: str, name: str, dtype: torch.dtype | None) -> Result | None:
        """The read of (ref, name, dtype) scheduled for ``step`` (waiting for it), or None
        when none was scheduled; a failed read re-raises its error here."""
        with self._lock:
            queue = self._queued.get((step, ref, name, dtype))
            if not queue:
                return None
            future = queue.popleft()
        return future.result()

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
