"""The one streaming driver: references in, a per-step function, `ShardedWriter` out.

Every streaming command (merge, compress / restore, continual merging, LoRA extraction) is
planning plus a per-step function on this driver:

- `Sources` holds the opened input references (`open_checkpoint`), reads one tensor at a
  time, counts the bytes read (progress) and, given a record, hashes what it read (the
  input digests that `--resume` re-checks, `splice.engine.resume_check`).
- `passes` runs a statistic pass: a function over every step, on a thread pool, results in
  step order (so a sum over them does not depend on the threads).
- `write_stream` writes the planned outputs: it opens the `ShardedWriter` (atomic folder,
  lock, overwrite rule), on ``resume`` keeps the finished shards whose inputs still hold,
  runs the pending steps, each returning its `Output` tensors, and finalizes with the
  extra files and the side files copied from one list (`io.open.model_side_files`).

Steps run on ``threads`` workers, in step order, with at most ``threads + read_ahead`` in
flight and at most ``memory_budget`` bytes of estimated step memory (`cost`; a step larger
than the budget runs alone), so peak memory is about max(budget, the largest step) plus the
interpreter, independent of model size. A spec that lists each step's reads (`Stream.reads`)
gets them read ahead on one reader thread (`splice.engine.prefetch`): read, converted to the
step's dtype, hashed and checked while the workers compute and write earlier steps, inside
the same budget (a step's reads start only once the step is admitted; a running step may
schedule more of its own, `Sources.ahead`, such as its next row chunk, which its cost then
counts). Reading (pread / mapped pages), computing (torch) and writing (pwrite) release the
GIL, so they overlap. Every step's outputs are the same whatever the threads and
read-ahead: a step gets fresh tensors of the same bytes either way.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from tqdm import tqdm

import splice
from splice.engine.prefetch import Call, Prefetcher, Read, Result
from splice.errors import MergeValidationError
from splice.io import CheckpointReader, ShardedWriter, model_dir_of, plan_shards
from splice.io.base import TensorInfo
from splice.io.mapped import read_as, read_rows_as
from splice.io.open import TOKENIZER_FILES, model_side_files
from splice.reference import open_checkpoint

T = TypeVar("T")

_current = threading.local()  # .step: the step a worker thread is running (prefetch lookups)

# The side files a written model takes from its model folder (a merge writes its own
# config.json and copies only the tokenizer's).
MODEL_FILES = ("config.json", *TOKENIZER_FILES)


def side_files(*refs: str | os.PathLike[str], names: tuple[str, ...] = MODEL_FILES) -> list[Path]:
    """The side files of the first reference with a model folder (`model_side_files`: each
    checked before any output is written); none when no reference has one."""
    for ref in refs:
        if model_dir_of(ref) is not None:
            return model_side_files(ref, names)
    return []


def source_key(ref: str, name: str) -> str:
    """Record key of input tensor `name` of reference `ref` (in a shard's input record)."""
    return json.dumps(["read", ref, name])


@dataclass
class Output:
    """One planned output tensor of a step, with the digests of what it was made from.

    A large tensor may come as ``rows`` instead of ``tensor``: an iterable of its row chunks
    in order, computed as the driver writes them (`ShardedWriter.write_rows`), so only one
    chunk is held at a time; ``record`` is read once the last chunk is written."""

    name: str
    tensor: torch.Tensor | None
    record: Mapping[str, str] = field(default_factory=dict)
    rows: Iterable[torch.Tensor] | None = None


class Sources:
    """The input references of a run, by reference string; closed together."""

    def __init__(self, readers: Mapping[str, CheckpointReader]):
        self.readers = dict(readers)
        self.bytes_read = 0
        self._lock = threading.Lock()
        self.prefetcher: Prefetcher | None = None  # set by `write_stream` while it runs

    @classmethod
    def open(cls, refs: Iterable[str | os.PathLike[str]], *, allow_nonfinite: bool) -> Sources:
        """Open every reference (headers only); NaN / ±inf refused unless allowed."""
        readers: dict[str, CheckpointReader] = {}
        try:
            for ref in refs:
                key = os.fspath(ref)
                if key not in readers:
                    readers[key] = open_checkpoint(key, check_finite=not allow_nonfinite)
        except BaseException:
            for r in readers.values():
                r.close()
            raise
        return cls(readers)

    def __getitem__(self, ref: str | os.PathLike[str]) -> CheckpointReader:
        return self.readers[os.fspath(ref)]

    def read(
        self,
        ref: str | os.PathLike[str],
        name: str,
        record: dict[str, str] | None = None,
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """Tensor ``name`` of ``ref``, a fresh tensor of ``dtype`` (None: as stored; the
        conversion reads mapped pages, `splice.io.mapped`); the digest of its stored bytes
        goes into ``record`` when one is given. Taken from the read-ahead when the running
        step scheduled this read."""
        key = os.fspath(ref)
        future = self._scheduled((key, name, dtype))
        got: Result = (
            future.result()
            if future is not None
            else self.read_now(key, name, dtype, record is not None)
        )
        t, sha = got
        if record is not None:
            assert sha is not None
            record[source_key(key, name)] = sha
        return t

    def _scheduled(self, key: Hashable) -> Future[Any] | None:
        """The read-ahead's future of ``key`` (a read's (reference, name, dtype) or a call's
        key) for the running step, or None when it scheduled none (or there is no reader)."""
        step = getattr(_current, "step", None)
        if self.prefetcher is None or step is None:
            return None
        return self.prefetcher.take(step, key)

    def ahead(self, call: Call) -> None:
        """Start ``call`` on the read-ahead for the running step, to `fetch` later (no-op
        without a reader thread: `fetch` then runs it)."""
        step = getattr(_current, "step", None)
        if self.prefetcher is not None and step is not None:
            self.prefetcher.schedule(step, [call])

    def fetch(self, call: Call) -> Any:
        """The result of ``call``: taken from the read-ahead when the running step scheduled
        it (`ahead`, or its `Stream.reads` at admission), waiting for it if it is running;
        else, and when the reader thread has not started it yet (busy with other steps'
        reads: it is cancelled there), run now on this thread."""
        future = self._scheduled(call.key)
        if future is None or future.cancel():
            return call.fn()
        return future.result()

    def read_rows(
        self,
        ref: str,
        name: str,
        start: int,
        stop: int,
        dtype: torch.dtype | None = None,
        hasher: Any = None,
    ) -> torch.Tensor:
        """Rows [start, stop) of tensor ``name`` of ``ref``, a fresh tensor of ``dtype``
        (None: as stored; the conversion reads mapped pages), their stored bytes fed to
        ``hasher`` when one is given (`io.mapped.read_rows_as`)."""
        reader = self.readers[ref]
        t = read_rows_as(reader, name, start, stop, dtype, hasher)
        info = reader.info(name)
        with self._lock:
            self.bytes_read += info.nbytes // max(info.shape[0], 1) * (stop - start)
        return t

    def read_now(
        self, ref: str, name: str, dtype: torch.dtype | None, digest: bool = True
    ) -> Result:
        """Read (and convert, hash) one tensor on this thread; counts the bytes read."""
        reader = self.readers[ref]
        t, sha = read_as(reader, name, dtype, digest=digest)
        with self._lock:
            self.bytes_read += reader.info(name).nbytes
        return t, sha

    def check_same_tensors(self, base: str, other: str, what: str) -> None:
        """``other`` has exactly the tensor names and shapes of ``base``."""
        ref, oth = self[base], self[other]
        names, other_names = set(ref.names()), set(oth.names())
        if names != other_names:
            diff = sorted(names ^ other_names)
            raise MergeValidationError(
                f"{what} does not have the base's tensors (first difference: '{diff[0]}')"
            )
        for n in ref.names():
            if ref.info(n).shape != oth.info(n).shape:
                raise MergeValidationError(
                    f"shape mismatch: tensor '{n}' has shape {list(oth.info(n).shape)} in "
                    f"{what}, {list(ref.info(n).shape)} in the base"
                )

    def close(self) -> None:
        for r in self.readers.values():
            r.close()

    def __enter__(self) -> Sources:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def passes(
    fn: Callable[[int], T],
    steps: Iterable[int],
    *,
    threads: int = 1,
    label: str = "",
    progress: bool = False,
) -> list[T]:
    """``fn(step)`` for every step, the results in step order: inline with one thread, else
    on ``threads`` workers (an error cancels the steps not yet started)."""
    steps = list(steps)
    bar = tqdm(total=len(steps), desc=label, unit="tensor", disable=not progress, leave=False)
    out: list[T] = []
    try:
        if threads <= 1:
            for i in steps:
                out.append(fn(i))
                bar.update(1)
            return out
        with ThreadPoolExecutor(max_workers=threads) as pool:
            futures = [pool.submit(fn, i) for i in steps]
            try:
                for f in futures:
                    out.append(f.result())
                    bar.update(1)
            except BaseException:
                for f in futures:
                    f.cancel()
                raise
    finally:
        bar.close()
    return out


@dataclass
class StreamReport:
    out_dir: Path
    tensors: int  # steps run (one output tensor each in a merge)
    skipped: int  # output tensors kept from a resumed run
    bytes_read: int
    bytes_written: int
    seconds: float


@dataclass
class Stream:
    """What `write_stream` writes and how; see the module docstring."""

    outputs: list[TensorInfo]  # every planned output tensor, in order
    metadata: dict[str, str]  # besides format and splice_version
    # The output names each step writes; default: one step per output tensor.
    step_outputs: list[list[str]] | None = None
    shard_bytes: int = 2_000_000_000
    overwrite: int | bool = False
    allow_nonfinite: bool = False
    side_files: list[Path] = field(default_factory=list)
    resume: bool = False
    fingerprint: str = ""
    # On resume: why a kept shard's recorded inputs no longer hold, or None.
    input_check: Callable[[dict[str, str]], str | None] | None = None
    threads: int = 1
    memory_budget: int = 1_000_000_000
    cost: Callable[[int], int] = lambda i: 0  # estimated bytes of a step at its peak
    # The reads of a step, in its order (for the read-ahead); None: steps read for themselves.
    reads: Callable[[int], list[Read | Call]] | None = None
    read_ahead: int = 1  # steps admitted beyond the busy workers (their reads start at once)
    progress: bool = False
    label: str = "writing"


def write_stream(
    out_dir: str | Path,
    spec: Stream,
    sources: Sources,
    step: Callable[[int], list[Output]],
    *,
    before: Callable[[list[int]], None] | None = None,
    extra_files: Callable[[], Mapping[str, bytes]] | None = None,
) -> StreamReport:
    """Run ``step`` for every step not already done and write its outputs into ``out_dir``.

    ``before(pending)`` runs once the pending steps are known (statistic passes);
    ``extra_files()`` after the last step (files computed from the whole run)."""
    start = time.perf_counter()
    out_dir = Path(out_dir)
    steps = spec.step_outputs or [[o.name] for o in spec.outputs]
    writer = ShardedWriter(
        out_dir,
        plan_shards(spec.outputs, spec.shard_bytes),
        {"format": "pt", "splice_version": splice.__version__, **spec.metadata},
        resume=spec.resume,
        fingerprint=spec.fingerprint,
        overwrite=spec.overwrite,
        inputs=list(sources.readers),  # for the overwrite and permission rules
    )
    try:
        if spec.resume and spec.input_check is not None:
            writer.drop_shards(spec.input_check)
        done = writer.completed_tensors()
        pending = [i for i, names in enumerate(steps) if not all(n in done for n in names)]
        if before is not None:
            before(pending)

        def run(i: int) -> int:
            written = 0
            for o in step(i):
                if o.rows is None:
                    assert o.tensor is not None
                    writer.write(
                        o.name, o.tensor, inputs=o.record, allow_nonfinite=spec.allow_nonfinite
                    )
                    written += o.tensor.numel() * o.tensor.element_size()
                    continue
                rows = writer.write_rows(o.name, allow_nonfinite=spec.allow_nonfinite)
                try:
                    for chunk in o.rows:
                        rows.write(chunk)
                        written += chunk.numel() * chunk.element_size()
                        del chunk
                    rows.close(inputs=o.record)
                except BaseException:
                    rows.abandon()
                    raise
            return written

        total = {o.name: o.nbytes for o in spec.outputs}
        planned = sum(total[n] for i in pending for n in steps[i])
        if spec.reads is not None:
            sources.prefetcher = Prefetcher(lambda ref, name, dt: sources.read_now(ref, name, dt))
        try:
            written = _run_steps(run, pending, spec, sources, planned)
        finally:
            if sources.prefetcher is not None:
                sources.prefetcher.close()
                sources.prefetcher = None
        writer.finalize(
            extra_files=dict(extra_files() if extra_files else {}), copy_files=spec.side_files
        )
    except BaseException:
        writer.abort()
        raise
    return StreamReport(
        out_dir=out_dir,
        tensors=len(pending),
        skipped=len(done),
        bytes_read=sources.bytes_read,
        bytes_written=written,
        seconds=time.perf_counter() - start,
    )


def _run_steps(
    run: Callable[[int], int], pending: list[int], spec: Stream, sources: Sources, total: int
) -> int:
    """Run steps in order: at most threads + read_ahead in flight, and no more than the
    memory budget of estimated step memory (a step larger than the budget runs alone). A
    step's reads are scheduled on the read-ahead when it is admitted."""
    threads = spec.threads
    prefetcher = sources.prefetcher
    written = 0
    t0 = time.perf_counter()
    bar = tqdm(total=len(pending), desc=spec.label, unit="tensor", disable=not spec.progress)
    in_flight: dict[Future[int], int] = {}
    queue = deque(pending)

    def run_step(i: int) -> int:
        _current.step = i
        try:
            return run(i)
        finally:
            _current.step = None
            if prefetcher is not None:
                prefetcher.drop(i)

    try:
        with ThreadPoolExecutor(max_workers=threads) as pool:

            def top_up() -> None:
                while queue and len(in_flight) < threads + max(spec.read_ahead, 0):
                    cost = spec.cost(queue[0])
                    if in_flight and sum(in_flight.values()) + cost > spec.memory_budget:
                        return
                    i = queue.popleft()
                    if prefetcher is not None and spec.reads is not None:
                        prefetcher.schedule(i, spec.reads(i))
                    in_flight[pool.submit(run_step, i)] = cost

            top_up()
            while in_flight:
                finished, _ = wait(in_flight, return_when=FIRST_COMPLETED)
                for f in finished:
                    del in_flight[f]
                    written += f.result()  # re-raises a step's error
                    bar.update(1)
                elapsed = max(time.perf_counter() - t0, 1e-9)
                bar.set_postfix_str(
                    f"read {sources.bytes_read / elapsed / 1e6:.0f} MB/s, "
                    f"wrote {written / 1e6:.0f}/{total / 1e6:.0f} MB",
                    refresh=False,
                )
                top_up()
    except BaseException:
        for f in in_flight:
            f.cancel()
        raise
    finally:
        bar.close()
    return written
