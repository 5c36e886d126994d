"""A streaming, thread-safe, resumable writer of sharded safetensors checkpoints.

The folder (location check, lock, `<out_dir>.splice-partial/`, overwrite rule, permissions,
atomic rename) is `splice.io.output_folder.OutputFolder`'s; this module fills the shards.

1. Construction checks the location and takes the folder's lock (a second writer of the same
   `out_dir` is refused), then lays out each shard not yet complete as
   `X.safetensors.partial`: header first (shapes and dtypes come from the plan), sized to its
   final length.
2. `write(name, tensor, inputs=...)`, from any number of threads, checks dtype and shape
   (nothing is cast), `pwrite`s the bytes at the tensor's offset and hashes them. When a
   shard's last tensor lands, it is fsynced, its record (digests of header, tensors and the
   given `inputs`; `splice.io.shard_record`) is stored, and it is renamed to `X.safetensors`:
   that rename marks it complete.
3. `finalize(...)` writes the index (more than one shard), extra and copied files, and commits
   the folder: nothing exists at `out_dir` before that rename.
4. `abort()` closes files, unlocks, and leaves the partial folder for `resume=True`.

Resume rule: the partial folder holds a digest of the caller's fingerprint (recipe, input
paths), the shard plan and the metadata; a different digest is a CheckpointError telling the
user to delete the folder or drop --resume (a silent restart could discard hours of work).
With a matching digest a complete shard is kept only when its record exists and re-hashing
the file gives the recorded digests; the caller then re-checks the inputs behind the kept
shards (`drop_shards`). Shards redone are reported on one `splice: note:` line. Without
`resume` an existing partial folder is deleted and the run starts fresh.

Caller bugs (an unplanned name, a wrong dtype or shape, a tensor written twice, finalize
before every tensor was written) raise ValueError / RuntimeError, not SpliceError.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from splice.errors import CheckpointError
from splice.io.base import TensorInfo
from splice.io.direct_write import DirectFile
from splice.io.finite import check_output
from splice.io.output_folder import (
    MARKER_NAME,
    STATE_DIR,
    OutputFolder,
    fsync_dir,
    partial_dir_of,
    pwrite_all,
    write_bytes,
)
from splice.io.safe_paths import open_regular, require_regular
from splice.io.shard_plan import ShardPlan, plan_shards
from splice.io.shard_record import (
    ShardRecord,
    content_hasher,
    digest,
    layout_digest,
    notice_redone,
    raw_bytes,
    record_path,
    remove_quietly,
    resume_record,
)
from splice.io.sizes import parse_size

__all__ = [
    "INDEX_NAME",
    "ShardPlan",
    "ShardedWriter",
    "parse_size",
    "partial_dir_of",
    "plan_shards",
]

INDEX_NAME = "model.safetensors.index.json"
FINGERPRINT_NAME = "fingerprint"
PARTIAL_SUFFIX = ".partial"


@dataclass
class _ShardState:
    plan: ShardPlan
    header: bytes
    written: set[str] = field(default_factory=set)
    in_flight: set[str] = field(default_factory=set)
    file: DirectFile | None = None
    complete: bool = False
    digests: dict[str, str] = field(default_factory=dict)
    inputs: dict[str, str] = field(default_factory=dict)


class ShardedWriter:
    """Write planned shards into a temporary folder, then move it into place atomically."""

    def __init__(
        self,
        out_dir: str | os.PathLike[str],
        shards: list[ShardPlan],
        metadata: dict[str, str],
        resume: bool = False,
        fingerprint: str = "",
        overwrite: int | bool = False,
        inputs: Iterable[str | os.PathLike[str]] = (),
    ) -> None:
        """`overwrite`: 0 refuses an existing `out_dir`, 1 replaces a previous splice output,
        2 replaces any folder (`splice.io.out_location`). `inputs`: the references this
        output is made from (for the overwrite and permission rules)."""
        self.out_dir = Path(out_dir)
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise ValueError("safetensors metadata must map strings to strings")
        self.metadata = dict(metadata)

        self._states: dict[str, _ShardState] = {}
        self._where: dict[str, tuple[_ShardState, TensorInfo, int]] = {}
        for plan in shards:
            if plan.filename in self._states or plan.filename in _RESERVED:
                raise ValueError(f"shard file name '{plan.filename}' is used twice or reserved")
            state = _ShardState(plan=plan, header=plan.header(self.metadata))
            self._states[plan.filename] = state
            for info, (begin, _end) in zip(plan.tensors, plan.offsets):
                if info.name in self._where:
                    raise ValueError(f"tensor '{info.name}' is planned in two shards")
                self._where[info.name] = (state, info, len(state.header) + begin)

        self.folder = OutputFolder(out_dir, overwrite=overwrite, inputs=inputs)
        self.tmp_dir = self.folder.partial
        self._lock = threading.Lock()
        self._finished = False
        self._digest = layout_digest(fingerprint, shards, self.metadata)
        self.folder.acquire()
        try:
            self._prepare(resume)
        except BaseException:
            self.folder.release()
            raise

    # -- setup --------------------------------------------------------------------------

    def _prepare(self, resume: bool) -> None:
        tmp, state_dir = self.tmp_dir, self.folder.state_dir
        stamp_file = state_dir / FINGERPRINT_NAME
        if resume and tmp.is_dir() and not tmp.is_symlink():
            stored = stamp_file.read_text().strip() if stamp_file.is_file() else None
            if stored != self._digest:
                raise CheckpointError(
                    f"cannot resume: the partial output {tmp} was written for a different "
                    "recipe, inputs or shard plan (or has no fingerprint); delete that folder "
                    "or run without --resume"
                )
            self._keep_complete_shards()
        else:
            self.folder.fresh_partial()
            with self.folder.mapped("cannot create the output"):
                state_dir.mkdir()
                write_bytes(stamp_file, (self._digest + "\n").encode())
                fsync_dir(tmp)
        for state in self._states.values():
            if not state.complete:
                self._lay_out(state)

    def _keep_complete_shards(self) -> None:
        """Keep the complete shards whose file still matches their record; redo the rest."""
        state_dir = self.folder.state_dir
        redo: list[tuple[str, str]] = []
        with self.folder.mapped("cannot resume the output"):
            state_dir.mkdir(exist_ok=True)
            for entry in self.tmp_dir.iterdir():
                if entry.name.endswith(PARTIAL_SUFFIX):
                    entry.unlink()
            for name, state in self._states.items():
                path, rec_path = self.tmp_dir / name, record_path(state_dir, name)
                record, reason = resume_record(
                    path, rec_path, state.header, _size(state), _regions(state)
                )
                if reason is not None:
                    redo.append((name, reason))
                if record is None:
                    continue
                state.complete = True
                state.written = {t.name for t in state.plan.tensors}
                state.digests, state.inputs = record.tensors, record.inputs
        notice_redone(redo)

    def drop_shards(self, check: Callable[[dict[str, str]], str | None]) -> None:
        """Redo every complete shard whose recorded inputs `check` rejects (it returns why).

        For resuming: `check` gets the input digests given to `write` for the shard's tensors.
        """
        redo: list[tuple[str, str]] = []
        for name, state in self._states.items():
            if not state.complete or not state.plan.tensors:
                continue
            reason = check(dict(state.inputs))
            if reason is None:
                continue
            redo.append((name, reason))
            with self.folder.mapped("cannot resume the output"):
                remove_quietly(self.tmp_dir / name, record_path(self.folder.state_dir, name))
            state.complete, state.written = False, set()
            state.digests, state.inputs = {}, {}
            self._lay_out(state)
        notice_redone(redo)

    def _lay_out(self, state: _ShardState) -> None:
        """Create `X.safetensors.partial` with its header, sized to its final length."""
        path = self.tmp_dir / (state.plan.filename + PARTIAL_SUFFIX)
        with self.folder.mapped("cannot write the output"):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
            try:
                pwrite_all(fd, memoryview(state.header), 0, path)
                os.ftruncate(fd, _size(state))
            finally:
                os.close(fd)
        if not state.plan.tensors:
            self._complete(state, None)

    # -- writing ------------------------------------------------------------------------

    def write(
        self,
        name: str,
        tensor: torch.Tensor,
        inputs: Mapping[str, str] | None = None,
        *,
        allow_nonfinite: bool = False,
    ) -> None:
        """Store one planned tensor; thread-safe. Dtype and shape must match the plan exactly.

        `inputs`: digests of what the tensor was made from (source key -> digest), kept in
        the shard's record for `drop_shards` on resume. A floating tensor holding NaN / ±inf
        (e.g. float16 overflow in the cast to the output dtype) is a `NonFiniteError` naming
        it, unless ``allow_nonfinite``.
        """
        state, info, offset = self._planned(name)
        if tensor.dtype != info.dtype or tuple(tensor.shape) != info.shape:
            raise ValueError(
                f"tensor '{name}': planned {info.dtype} {list(info.shape)}, got "
                f"{tensor.dtype} {list(tensor.shape)} (the writer casts nothing)"
            )
        if not allow_nonfinite:
            check_output(tensor, name)
        state, file = self._begin(name)
        try:
            data = raw_bytes(tensor) if info.numel else memoryview(b"")
            file.pwrite(data, offset)
            sha = digest(data)
        except BaseException:
            self._abandon(state, name)
            raise
        self._end(state, name, sha, inputs)

    def write_rows(self, name: str, *, allow_nonfinite: bool = False) -> RowWriter:
        """A `RowWriter` storing planned tensor ``name`` in row chunks, in order (for a tensor
        merged a chunk at a time); thread-safe like `write`, with the same checks per chunk."""
        _, info, offset = self._planned(name)
        if not info.shape:
            raise ValueError(f"tensor '{name}' has no rows (a 0-d tensor): use write()")
        begun = self._begin(name)
        return RowWriter(self, name, info, offset, begun, allow_nonfinite)

    def _planned(self, name: str) -> tuple[_ShardState, TensorInfo, int]:
        try:
            return self._where[name]
        except KeyError:
            raise ValueError(f"tensor '{name}' is not in the output plan") from None

    def _begin(self, name: str) -> tuple[_ShardState, DirectFile]:
        """Mark ``name`` in flight; the open file of its shard (written past the page cache
        where the file system allows: `splice.io.direct_write`)."""
        state = self._where[name][0]
        path = self.tmp_dir / (state.plan.filename + PARTIAL_SUFFIX)
        with self._lock:
            if self._finished:
                raise RuntimeError("write() after finalize() or abort()")
            if state.complete or name in state.written or name in state.in_flight:
                raise ValueError(f"tensor '{name}' was written twice")
            if state.file is None:
                state.file = DirectFile(path)
            state.in_flight.add(name)
            return state, state.file

    def _abandon(self, state: _ShardState, name: str) -> None:
        with self._lock:
            state.in_flight.discard(name)

    def _end(
        self, state: _ShardState, name: str, sha: str, inputs: Mapping[str, str] | None
    ) -> None:
        """Record ``name`` written; complete its shard when it was the last."""
        with self._lock:
            state.in_flight.discard(name)
            state.written.add(name)
            state.digests[name] = sha
            state.inputs.update(inputs or {})
            done = len(state.written) == len(state.plan.tensors)
            if done:
                file, state.file = state.file, None
        if done:
            self._complete(state, file)

    def _complete(self, state: _ShardState, file: DirectFile | None) -> None:
        """fsync, store the shard's record, then rename it complete."""
        partial = self.tmp_dir / (state.plan.filename + PARTIAL_SUFFIX)
        record = ShardRecord(digest(state.header), dict(state.digests), dict(state.inputs))
        with self.folder.mapped("cannot write the output"):
            if file is None:
                file = DirectFile(partial, direct=False)
            try:
                file.fsync()
            finally:
                file.close()
            write_bytes(record_path(self.folder.state_dir, state.plan.filename), record.to_bytes())
            os.rename(partial, self.tmp_dir / state.plan.filename)
            fsync_dir(self.tmp_dir)
        with self._lock:
            state.complete = True

    def completed_tensors(self) -> set[str]:
        """Names of the tensors in complete shards (to skip when resuming)."""
        with self._lock:
            return {t.name for s in self._states.values() if s.complete for t in s.plan.tensors}

    # -- ending -------------------------------------------------------------------------

    def finalize(
        self,
        extra_files: dict[str, bytes] | None = None,
        copy_files: list[Path] | None = None,
    ) -> Path:
        """Write index and side files, then rename the temporary folder to `out_dir`.

        `copy_files` are copied only if they are regular files (`safe_paths.open_regular`);
        the callers choose them with `safe_paths.side_files`, which also keeps them inside the
        model folder's allowed root.
        """
        extra_files = dict(extra_files or {})
        copy_files = [Path(p) for p in copy_files or []]
        with self._lock:
            if self._finished:
                raise RuntimeError("finalize() after finalize() or abort()")
            incomplete = [s for s in self._states.values() if not s.complete]
            missing = [
                t.name for s in incomplete for t in s.plan.tensors if t.name not in s.written
            ]
            if incomplete:
                shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
                raise RuntimeError(f"finalize(): {len(missing)} tensors never written: {shown}")

        taken = set(self._states)
        if len(self._states) > 1:
            taken.add(INDEX_NAME)
        for name in [*extra_files, *(p.name for p in copy_files)]:
            if name != os.path.basename(name) or name in ("", ".", "..", *_RESERVED):
                raise CheckpointError(f"output side file '{name}' is not a plain file name")
            if name in taken:
                raise CheckpointError(f"output side file '{name}' clashes with another output file")
            taken.add(name)
        for src in copy_files:
            try:
                require_regular(src)  # a FIFO or device is refused here, never opened
            except CheckpointError as e:
                raise CheckpointError(f"cannot copy into the output: {e}") from None

        with self.folder.mapped("cannot write the output"):
            if len(self._states) > 1:
                write_bytes(self.tmp_dir / INDEX_NAME, self._index_json())
            for name, data in extra_files.items():
                write_bytes(self.tmp_dir / name, data)
            for src in copy_files:  # regular files only (`safe_paths.open_regular`)
                dst = self.tmp_dir / src.name
                with open(open_regular(src), "rb") as f_in, open(dst, "wb") as f_out:
                    shutil.copyfileobj(f_in, f_out)
                    f_out.flush()
                    os.fsync(f_out.fileno())
        self.folder.commit()
        with self._lock:
            self._finished = True
        return self.out_dir

    def _index_json(self) -> bytes:
        weight_map = {
            t.name: s.plan.filename for s in self._states.values() for t in s.plan.tensors
        }
        total = sum(s.plan.data_bytes for s in self._states.values())
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        return (json.dumps(index, indent=2) + "\n").encode()

    def abort(self) -> None:
        """Close open shard files, unlock, and leave the partial folder for `resume=True`."""
        with self._lock:
            self._finished = True
            for state in self._states.values():
                if state.file is not None:
                    state.file.close()
                    state.file = None
        self.folder.release(keep_partial=True)

    def __enter__(self) -> ShardedWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None:
            self.abort()


# -- helpers ----------------------------------------------------------------------------

_RESERVED = (INDEX_NAME, MARKER_NAME, STATE_DIR)


def _size(state: _ShardState) -> int:
    return len(state.header) + state.plan.data_bytes


def _regions(state: _ShardState) -> list[tuple[str, int, int]]:
    h = len(state.header)
    return [(t.name, h + b, h + e) for t, (b, e) in zip(state.plan.tensors, state.plan.offsets)]


class RowWriter:
    """One planned tensor written in row chunks (`ShardedWriter.write_rows`): each chunk is
    checked (dtype, trailing shape, NaN / ±inf), written at its place and hashed in order, so
    the shard's record is the same as for a whole-tensor `write`. `close(inputs)` after the
    last row completes the tensor (and its shard, when it was the last); `abandon()` after a
    failure."""

    def __init__(
        self,
        writer: ShardedWriter,
        name: str,
        info: TensorInfo,
        offset: int,
        begun: tuple[_ShardState, DirectFile],
        allow_nonfinite: bool,
    ) -> None:
        self.writer, self.name, self.info = writer, name, info
        self.state, self.file = begun
        self.allow_nonfinite = allow_nonfinite
        self.row_bytes = info.nbytes // info.shape[0] if info.shape[0] else 0
        self.offset = offset
        self.rows = 0
        self.sha = content_hasher()

    def write(self, chunk: torch.Tensor) -> None:
        """Store the next rows."""
        info = self.info
        if (
            chunk.dtype != info.dtype
            or tuple(chunk.shape[1:]) != info.shape[1:]
            or (self.rows + chunk.shape[0] > info.shape[0])
        ):
            raise ValueError(
                f"tensor '{self.name}': planned {info.dtype} {list(info.shape)}, got rows "
                f"{self.rows}..{self.rows + chunk.shape[0]} of {chunk.dtype} "
                f"{list(chunk.shape)} (the writer casts nothing)"
            )
        if not self.allow_nonfinite:
            check_output(chunk, self.name)
        data = raw_bytes(chunk) if chunk.numel() else memoryview(b"")
        self.file.pwrite(data, self.offset + self.rows * self.row_bytes)
        self.sha.update(data)
        self.rows += chunk.shape[0]

    def close(self, inputs: Mapping[str, str] | None = None) -> None:
        """The tensor is complete: every planned row was written."""
        if self.rows != self.info.shape[0]:
            raise RuntimeError(
                f"tensor '{self.name}': {self.rows} of {self.info.shape[0]} rows written"
            )
        self.writer._end(self.state, self.name, self.sha.hexdigest(), inputs)

    def abandon(self) -> None:
        self.writer._abandon(self.state, self.name)
