"""Peak memory of a step of the bench: the growth of the process's resident set.

`PeakRSS` samples the resident set size (RSS, psutil) every ``interval`` seconds in a
daemon thread while its ``with`` block runs and reports the highest value minus the value
on entry, in MiB. What it measures: the extra memory the step made resident (tensors,
statistics, autograd graphs), not what was resident before (the evaluator, the cached
features). Limits: a sampler misses a peak shorter than its interval (2 ms by default;
PyTorch's large CPU allocations are page-touched, so they last longer than that), and memory
freed earlier but kept by the allocator is reused without growing the RSS, so a step after
a larger one can read low (on 2026-12-03 an FW-Merging row run after a larger one read
+0.8 MiB). On entry the heap's freed memory is given back first
(`splice.engine.heap.trim_heap`, glibc's ``malloc_trim``), which lowers the start value by
what glibc kept in its heap; memory kept elsewhere (torch's caches, mapped buffers still
held) is still reused unseen. Figures compare methods run in the same process and order.
"""

from __future__ import annotations

import threading
from types import TracebackType


class PeakRSS:
    """``with PeakRSS() as m: ...``; then ``m.mb``: the peak RSS growth in MiB."""

    def __init__(self, interval: float = 0.002):
        self.interval = interval
        self.start = 0
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @staticmethod
    def _rss() -> int:
        import psutil

        return int(psutil.Process().memory_info().rss)

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self._rss())

    def __enter__(self) -> PeakRSS:
        from splice.engine.heap import trim_heap

        trim_heap()  # what earlier steps freed but the allocator kept is not counted as in use
        self.start = self.peak = self._rss()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def mb(self) -> float:
        return round((self.peak - self.start) / 2**20, 1)
