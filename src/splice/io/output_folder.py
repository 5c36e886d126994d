"""One way to write an output folder: checked early, locked, built aside, renamed into place.

`OutputFolder(out, overwrite=N, inputs=[...])` is what every splice command that writes a
folder goes through (merge, continual merge, compress / restore, lora merge / extract / rmm /
compeft, train, saved adapters). Its lifecycle:

1. construction checks the location (`out_location.check_out_location`: not `.`, `..`, `/`,
   not a file, not under a file, writable), before any heavy work;
2. `acquire()` creates the parent folders and takes an exclusive, non-blocking `flock` on
   the sibling lock file `<out>.splice-lock` (holding the pid), then applies the overwrite
   rule (`out_location.overwrite_refusal`). A second process writing the same `--out` gets
   "OUT is being written by another splice process (pid N)". The kernel drops the lock when
   its holder dies, even by SIGKILL, so a stale lock file never blocks a later run;
3. the work happens in `<out>.splice-partial/` (`fresh_partial()`: emptied first; a resumable
   writer may keep it instead). Its `.splice-state/` subfolder is for the writer's own resume
   records and is dropped at commit;
4. `commit()` writes `MARKER_NAME`, narrows permissions to the inputs' (`permission_mask`),
   fsyncs every file and folder, checks the overwrite rule again, and renames the folder into
   place. An existing output is first renamed to `<out>.splice-old` and deleted after the new
   one is in place: there is a short moment with no `<out>`, never one with a half-written one;
5. `release(keep_partial)` unlocks (and removes the lock file).

Used as a context manager (`with OutputFolder(...) as tmp:`), it acquires and empties the
partial folder on entry, commits on success, and on an error removes the partial folder and
releases the lock; an OSError that comes from writing the output (no space, quota, read-only
filesystem, a path inside the partial folder) becomes a `CheckpointError`.

`cache_folder(final)` is the lock-free variant for content-addressed caches: a uniquely named
temporary folder beside `final`, renamed into place; when a racing run got there first, its
folder is kept.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from splice.errors import CheckpointError
from splice.io.out_location import (
    MARKER_NAME,
    check_out_location,
    folder_mask,
    input_paths,
    overwrite_refusal,
    permission_mask,
)

STATE_DIR = ".splice-state"
_DISK_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}


def partial_dir_of(out_dir: str | os.PathLike[str]) -> Path:
    """The temporary sibling folder a write into `out_dir` uses: `<out_dir>.splice-partial`."""
    p = Path(out_dir)
    return p.with_name(p.name + ".splice-partial")


def lock_file_of(out_dir: str | os.PathLike[str]) -> Path:
    p = Path(out_dir)
    return p.with_name(p.name + ".splice-lock")


class OutputFolder:
    """An output folder written atomically under an exclusive lock (see the module docstring)."""

    def __init__(
        self,
        out: str | os.PathLike[str],
        *,
        overwrite: int | bool = 0,
        inputs: Iterable[str | os.PathLike[str]] = (),
    ) -> None:
        self.shown = os.fspath(out)
        self.out = check_out_location(out)
        self.partial = partial_dir_of(self.out)
        self.state_dir = self.partial / STATE_DIR
        self.level = int(overwrite)
        self.inputs = input_paths(inputs)
        self.mask = permission_mask(self.inputs)
        self._lock_fd: int | None = None

    # -- lock ---------------------------------------------------------------------------

    def acquire(self) -> OutputFolder:
        """Create the parent folders, take the lock, apply the overwrite rule."""
        if self._lock_fd is not None:
            return self
        with self.mapped("cannot create the output"):
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self._lock_fd = _take_lock(lock_file_of(self.out), self.shown)
        try:
            self.check_existing()
        except BaseException:
            self.release()
            raise
        return self

    def check(self) -> OutputFolder:
        """The overwrite rule, early and without the lock (`acquire` applies it again)."""
        self.check_existing()
        return self

    def check_existing(self) -> None:
        refusal = overwrite_refusal(self.out, self.shown, self.level, self.inputs)
        if refusal:
            raise CheckpointError(refusal)

    def release(self, keep_partial: bool = True) -> None:
        """Unlock; remove the partial folder first unless `keep_partial`."""
        if self._lock_fd is None:
            return
        if not keep_partial:
            shutil.rmtree(self.partial, ignore_errors=True)
        fd, self._lock_fd = self._lock_fd, None
        try:
            lock = lock_file_of(self.out)
            if _same_file(fd, lock):
                lock.unlink()
        except OSError:
            pass
        finally:
            os.close(fd)

    @property
    def locked(self) -> bool:
        return self._lock_fd is not None

    def __del__(self) -> None:  # a writer dropped without abort() must not keep the lock
        if getattr(self, "_lock_fd", None) is not None:
            with contextlib.suppress(OSError):
                os.close(self._lock_fd)  # type: ignore[arg-type]

    # -- the partial folder -------------------------------------------------------------

    def fresh_partial(self) -> Path:
        """An empty `<out>.splice-partial/` (whatever was there is removed)."""
        assert self.locked, "acquire() first"
        with self.mapped("cannot create the output"):
            if self.partial.exists() or self.partial.is_symlink():
                remove(self.partial)
            os.mkdir(self.partial, 0o777 & folder_mask(self.mask))
        return self.partial

    def commit(self) -> Path:
        """Mark, narrow permissions, fsync, and rename the partial folder to the output."""
        assert self.locked, "acquire() first"
        with self.mapped("cannot finish the output"):
            if self.state_dir.exists():
                shutil.rmtree(self.state_dir)
            marker = {"written_by": "splice", "splice_version": _version()}
            write_bytes(self.partial / MARKER_NAME, (json.dumps(marker) + "\n").encode())
            _narrow_and_sync(self.partial, self.mask)
            self.check_existing()
            if self.out.exists() or self.out.is_symlink():
                old = self.out.with_name(self.out.name + ".splice-old")
                if old.exists() or old.is_symlink():
                    remove(old)
                os.rename(self.out, old)
                try:
                    os.rename(self.partial, self.out)
                except OSError:
                    os.rename(old, self.out)  # put the previous output back
                    raise
                fsync_dir(self.out.parent)
                remove(old)
            else:
                os.rename(self.partial, self.out)
            fsync_dir(self.out.parent)
        self.release()
        return Path(self.shown)

    @contextmanager
    def mapped(self, what: str) -> Iterator[None]:
        """OSError -> CheckpointError naming the output."""
        try:
            yield
        except OSError as e:
            raise CheckpointError(f"{what} {self.shown}: {_why(e)}") from e

    def __enter__(self) -> Path:
        self.acquire()
        try:
            return self.fresh_partial()
        except BaseException:
            self.release()
            raise

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        if exc is None:
            try:
                self.commit()
            except BaseException:
                self.release(keep_partial=False)
                raise
            return
        self.release(keep_partial=False)
        if isinstance(exc, OSError) and self.is_write_error(exc):
            raise CheckpointError(f"cannot write the output {self.shown}: {_why(exc)}") from exc

    def is_write_error(self, e: OSError) -> bool:
        """An OSError from writing this output (not from reading an input)."""
        if e.errno in _DISK_ERRORS:
            return True
        name = e.filename if isinstance(e.filename, str) else None
        return bool(name) and Path(os.path.abspath(name)).is_relative_to(self.partial)


@contextmanager
def cache_folder(final: Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``final``; rename it to ``final`` on success.

    No lock: two runs may build the same entry; if ``final`` appeared meanwhile, that one is
    kept. Used for content-addressed caches, where both builds are equal.
    """
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    except OSError as e:
        raise CheckpointError(f"cannot create the cache folder {final}: {_why(e)}") from e
    try:
        yield tmp
        _narrow_and_sync(tmp, 0o777)
        try:
            os.replace(tmp, final)
        except OSError:
            if not final.is_dir():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# -- file helpers -----------------------------------------------------------------------


def write_bytes(path: Path, data: bytes | memoryview) -> None:
    """Create (truncate) `path`, write all of `data`, fsync. OSError on failure."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):
            done += os.write(fd, view[done:])
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file_atomically(path: Path, data: bytes | memoryview) -> None:
    """Replace (or create) the single file ``path`` with ``data`` so that a crash never leaves
    a half-written file: the bytes go to a uniquely named hidden temporary file beside it
    (fsynced; the umask applies), which is renamed onto ``path``; the folder is fsynced after
    the rename. The temporary file is removed on any failure. OSError on failure (the caller
    words it)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.splice-partial")
    try:
        write_bytes(tmp, data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_path(path: Path, flags: int = os.O_RDONLY) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    fsync_path(path, os.O_RDONLY | os.O_DIRECTORY)


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def _narrow_and_sync(root: Path, mask: int) -> None:
    """chmod everything under `root` to at most `mask` (folders: `folder_mask`), fsync it."""
    dmask = folder_mask(mask)
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            f = Path(dirpath, name)
            if f.is_symlink():
                continue
            mode = f.stat().st_mode & 0o777
            if mode & ~mask:
                os.chmod(f, mode & mask)
            fsync_path(f)
        mode = Path(dirpath).stat().st_mode & 0o777
        if mode & ~dmask:
            os.chmod(dirpath, mode & dmask)
        fsync_dir(Path(dirpath))


def _take_lock(lock: Path, shown: str) -> int:
    """An fd holding an exclusive flock on `lock` (the file holds our pid)."""
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            who = f" (pid {pid})" if pid.isdigit() else ""
            raise CheckpointError(
                f"{shown} is being written by another splice process{who}; wait for it to "
                "finish or choose another --out"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        if _same_file(fd, lock):  # not unlinked by a holder that finished meanwhile
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            return fd
        os.close(fd)


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _why(e: OSError) -> str:
    return e.strerror or str(e)


def _version() -> str:
    import splice

    return splice.__version__


__all__ = [
    "MARKER_NAME",
    "OutputFolder",
    "cache_folder",
    "fsync_dir",
    "lock_file_of",
    "partial_dir_of",
    "remove",
    "write_bytes",
]


def pwrite_all(fd: int, data: memoryview, offset: int, path: Path) -> None:
    """Write all of `data` at `offset` of `fd` (from any thread); CheckpointError on failure."""
    data = data.cast("B")
    done = 0
    try:
        while done < len(data):
            done += os.pwrite(fd, data[done:], offset + done)
    except OSError as e:
        raise CheckpointError(f"{path}: write failed: {e.strerror}") from e
