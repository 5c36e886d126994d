"""A streaming, thread-safe, resumable writer of sharded safetensors checkpoints.

Lifecycle:

1. Construction checks the output folder (it must not exist unless `overwrite=True`), then
   prepares the temporary sibling folder `<out_dir>.splice-partial/`. Each shard not yet
   complete is laid out as `X.safetensors.partial`: its header is written first (all shapes
   and dtypes are known from the plan) and the file is sized to its final length.
2. `write(name, tensor)`, from any number of threads, checks dtype and shape against the plan
   (nothing is cast) and `pwrite`s the bytes at the tensor's offset. When a shard's last
   tensor lands, the shard is fsynced and renamed `X.safetensors.partial` -> `X.safetensors`;
   that rename is what marks it complete.
3. `finalize(...)` checks every shard is complete, writes `model.safetensors.index.json` when
   there is more than one shard, the extra files and the copied files, fsyncs, and renames the
   temporary folder to `out_dir`. Nothing exists at `out_dir` before that rename.
4. `abort()` closes files and leaves the temporary folder for a later `resume=True`.

Resume rule: the temporary folder holds a `fingerprint` file, a digest of the caller's
fingerprint (recipe, inputs), the shard plan and the metadata. With `resume=True` and a
matching digest, complete shards whose size and header are as planned are kept and partial
ones are redone; a different digest is a CheckpointError telling the user to delete the folder
or drop --resume (a silent restart could discard hours of work the user meant to keep). With
`resume=False` an existing temporary folder is deleted and the run starts fresh.

Overwrite rule: an existing `out_dir` is a CheckpointError at construction, before any heavy
work, unless `overwrite=True`; then, at finalize, the old folder is moved aside to
`<out_dir>.splice-old`, the new one renamed into place, and the old one deleted (two renames:
there is a short moment with no `out_dir`, never one with a half-written one).

Programming errors of the caller (an unplanned name, a wrong dtype or shape, a tensor written
twice, finalize before every tensor was written) raise ValueError / RuntimeError, not
SpliceError: they are bugs, not bad user input.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from splice.errors import CheckpointError
from splice.io.base import TensorInfo
from splice.io.safe_paths import open_regular, require_regular
from splice.io.shard_plan import ShardPlan, plan_shards
from splice.io.sizes import parse_size

__all__ = ["INDEX_NAME", "ShardPlan", "ShardedWriter", "parse_size", "plan_shards"]

INDEX_NAME = "model.safetensors.index.json"
FINGERPRINT_NAME = "fingerprint"
PARTIAL_SUFFIX = ".partial"


def partial_dir_of(out_dir: str | os.PathLike[str]) -> Path:
    """The temporary sibling folder a write into `out_dir` uses: `<out_dir>.splice-partial`."""
    p = Path(out_dir)
    return p.with_name(p.name + ".splice-partial")


@dataclass
class _ShardState:
    plan: ShardPlan
    header: bytes
    written: set[str] = field(default_factory=set)
    in_flight: set[str] = field(default_factory=set)
    fd: int = -1
    complete: bool = False


class ShardedWriter:
    """Write planned shards into a temporary folder, then move it into place atomically."""

    def __init__(
        self,
        out_dir: str | os.PathLike[str],
        shards: list[ShardPlan],
        metadata: dict[str, str],
        resume: bool = False,
        fingerprint: str = "",
        overwrite: bool = False,
    ) -> None:
        self.out_dir = Path(out_dir)
        self.tmp_dir = partial_dir_of(self.out_dir)
        self.overwrite = overwrite
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise ValueError("safetensors metadata must map strings to strings")
        self.metadata = dict(metadata)
        self._check_out_dir()

        self._states: dict[str, _ShardState] = {}
        self._where: dict[str, tuple[_ShardState, TensorInfo, int]] = {}
        for plan in shards:
            if plan.filename in self._states or plan.filename in (INDEX_NAME, FINGERPRINT_NAME):
                raise ValueError(f"shard file name '{plan.filename}' is used twice or reserved")
            state = _ShardState(plan=plan, header=plan.header(self.metadata))
            self._states[plan.filename] = state
            for info, (begin, _end) in zip(plan.tensors, plan.offsets):
                if info.name in self._where:
                    raise ValueError(f"tensor '{info.name}' is planned in two shards")
                self._where[info.name] = (state, info, len(state.header) + begin)

        self._lock = threading.Lock()
        self._finished = False
        self._digest = _digest(fingerprint, shards, self.metadata)
        self._prepare(resume)

    # -- setup --------------------------------------------------------------------------

    def _check_out_dir(self) -> None:
        if self.out_dir.exists() or self.out_dir.is_symlink():
            if not self.out_dir.is_dir():
                raise CheckpointError(f"output {self.out_dir} exists and is not a folder")
            if not self.overwrite:
                raise CheckpointError(
                    f"output folder {self.out_dir} already exists; choose another path or "
                    "allow overwriting it (--overwrite)"
                )

    def _prepare(self, resume: bool) -> None:
        tmp = self.tmp_dir
        stamp_file = tmp / FINGERPRINT_NAME
        if tmp.exists() and resume:
            stored = stamp_file.read_text().strip() if stamp_file.is_file() else None
            if stored != self._digest:
                raise CheckpointError(
                    f"cannot resume: the partial output {tmp} was written for a different "
                    "recipe, inputs or shard plan (or has no fingerprint); delete that folder "
                    "or run without --resume"
                )
            self._keep_complete_shards()
        else:
            if tmp.exists() or tmp.is_symlink():
                _remove(tmp)
            tmp.mkdir(parents=True)
            _write_file(stamp_file, (self._digest + "\n").encode())
            _fsync_dir(tmp)
        for state in self._states.values():
            if not state.complete:
                self._lay_out(state)

    def _keep_complete_shards(self) -> None:
        for entry in self.tmp_dir.iterdir():
            if entry.name.endswith(PARTIAL_SUFFIX):
                entry.unlink()
        for name, state in self._states.items():
            path = self.tmp_dir / name
            if path.is_file() and _matches_layout(path, state):
                state.complete = True
                state.written = {t.name for t in state.plan.tensors}
            elif path.exists():
                path.unlink()

    def _lay_out(self, state: _ShardState) -> None:
        """Create `X.safetensors.partial` with its header, sized to its final length."""
        path = self.tmp_dir / (state.plan.filename + PARTIAL_SUFFIX)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _pwrite_all(fd, memoryview(state.header), 0, path)
            os.ftruncate(fd, len(state.header) + state.plan.data_bytes)
        finally:
            os.close(fd)
        if not state.plan.tensors:
            self._complete(state, -1)

    # -- writing ------------------------------------------------------------------------

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Store one planned tensor; thread-safe. Dtype and shape must match the plan exactly."""
        try:
            state, info, offset = self._where[name]
        except KeyError:
            raise ValueError(f"tensor '{name}' is not in the output plan") from None
        if tensor.dtype != info.dtype or tuple(tensor.shape) != info.shape:
            raise ValueError(
                f"tensor '{name}': planned {info.dtype} {list(info.shape)}, got "
                f"{tensor.dtype} {list(tensor.shape)} (the writer casts nothing)"
            )
        path = self.tmp_dir / (state.plan.filename + PARTIAL_SUFFIX)
        with self._lock:
            if self._finished:
                raise RuntimeError("write() after finalize() or abort()")
            if state.complete or name in state.written or name in state.in_flight:
                raise ValueError(f"tensor '{name}' was written twice")
            if state.fd < 0:
                try:
                    state.fd = os.open(path, os.O_WRONLY)
                except OSError as e:
                    raise CheckpointError(f"{path}: cannot open for writing: {e.strerror}") from e
            state.in_flight.add(name)
            fd = state.fd
        try:
            if info.numel:
                data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
                _pwrite_all(fd, memoryview(data.numpy()), offset, path)
        except BaseException:
            with self._lock:
                state.in_flight.discard(name)
            raise
        with self._lock:
            state.in_flight.discard(name)
            state.written.add(name)
            done = len(state.written) == len(state.plan.tensors)
            if done:
                fd, state.fd = state.fd, -1
        if done:
            self._complete(state, fd)

    def _complete(self, state: _ShardState, fd: int) -> None:
        partial = self.tmp_dir / (state.plan.filename + PARTIAL_SUFFIX)
        if fd < 0:
            fd = os.open(partial, os.O_WRONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(partial, self.tmp_dir / state.plan.filename)
        _fsync_dir(self.tmp_dir)
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
            if name != os.path.basename(name) or name in ("", ".", "..", FINGERPRINT_NAME):
                raise CheckpointError(f"output side file '{name}' is not a plain file name")
            if name in taken:
                raise CheckpointError(f"output side file '{name}' clashes with another output file")
            taken.add(name)
        for src in copy_files:
            try:
                require_regular(src)  # a FIFO or device is refused here, never opened
            except CheckpointError as e:
                raise CheckpointError(f"cannot copy into the output: {e}") from None

        if len(self._states) > 1:
            _write_file(self.tmp_dir / INDEX_NAME, self._index_json())
        for name, data in extra_files.items():
            _write_file(self.tmp_dir / name, data)
        for src in copy_files:
            dst = self.tmp_dir / src.name
            with open(open_regular(src), "rb") as f_in, open(dst, "wb") as f_out:
                shutil.copyfileobj(f_in, f_out)
            _fsync_file(dst)
        (self.tmp_dir / FINGERPRINT_NAME).unlink(missing_ok=True)
        _fsync_dir(self.tmp_dir)

        self._check_out_dir()
        parent = self.out_dir.parent
        if self.out_dir.exists():
            old = self.out_dir.with_name(self.out_dir.name + ".splice-old")
            if old.exists() or old.is_symlink():
                _remove(old)
            os.rename(self.out_dir, old)
            os.rename(self.tmp_dir, self.out_dir)
            _fsync_dir(parent)
            _remove(old)
        else:
            os.rename(self.tmp_dir, self.out_dir)
        _fsync_dir(parent)
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
        """Close open shard files and leave the temporary folder for `resume=True`."""
        with self._lock:
            self._finished = True
            for state in self._states.values():
                if state.fd >= 0:
                    os.close(state.fd)
                    state.fd = -1

    def __enter__(self) -> ShardedWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None:
            self.abort()


# -- helpers ----------------------------------------------------------------------------


def _digest(fingerprint: str, shards: list[ShardPlan], metadata: dict[str, str]) -> str:
    layout = [
        [p.filename, [[t.name, str(t.dtype), list(t.shape)] for t in p.tensors], p.offsets]
        for p in shards
    ]
    blob = json.dumps([fingerprint, layout, metadata], sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()


def _matches_layout(path: Path, state: _ShardState) -> bool:
    """True when a complete shard on disk has the planned size and header."""
    expected_size = len(state.header) + state.plan.data_bytes
    if path.stat().st_size != expected_size:
        return False
    with open(path, "rb") as f:
        return f.read(len(state.header)) == state.header


def _pwrite_all(fd: int, data: memoryview, offset: int, path: Path) -> None:
    data = data.cast("B")
    done = 0
    try:
        while done < len(data):
            done += os.pwrite(fd, data[done:], offset + done)
    except OSError as e:
        raise CheckpointError(f"{path}: write failed: {e.strerror}") from e


def _write_file(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        _pwrite_all(fd, memoryview(data), 0, path)
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()
