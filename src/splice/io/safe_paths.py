"""What splice reads: the one guard for every file read on behalf of a user-named path.

The policy, for weights, shard indexes, configs, adapter files, recipe and config files, and
the side files (config, tokenizer) copied into an output alike:

1. The allowed root of a reference is the folder the user named, or for a named file the
   folder holding it, with links resolved (the named path may itself be a link: the user
   chose it). When that folder lies in a Hugging Face hub cache
   (``.../models--ORG--NAME/snapshots/REV/...``), the root is the ``models--ORG--NAME``
   folder, so the snapshot's links into ``../../blobs/`` are allowed.
2. A file splice finds inside a root (a folder member, a shard an index names, a side file)
   must really lie inside that root once every link and ``..`` is followed; a link or an index
   entry that leaves it (an absolute path, ``../..``) is a CheckpointError naming the path and
   the root, never the target or its bytes. A side file leaving the root is an error, not a
   silent skip: an output without its tokenizer would look complete and be wrong.
3. Only regular files are opened: ``stat`` first (a device is never opened), then
   ``open(O_NONBLOCK)`` and ``fstat`` again, so a FIFO, a device, a socket or a folder named
   like a checkpoint is an error at once, never a hang. Files handed to a library by path
   (torch, transformers, gguf) get the same checks before the library opens them.
4. Errors about a file's content give its name, offsets and lengths, never its bytes; names
   read from a file (tensor or shard names) are escaped and shortened by `shown`.

Checks are made when a file is opened: a folder rewritten while splice reads it is out of scope.
"""

from __future__ import annotations

import os
import reprlib
import stat
from pathlib import Path
from typing import Any

from splice.errors import CheckpointError, SpliceError

_HUB_PREFIXES = ("models--", "datasets--", "spaces--")

_repr = reprlib.Repr()
_repr.maxstring = 80
_repr.maxother = 80
_repr.maxlist = _repr.maxdict = _repr.maxtuple = 6
_repr.maxlevel = 3


def shown(value: Any) -> str:
    """A short, escaped repr of a value read from a file, safe to put in an error message."""
    return _repr.repr(value)


def allowed_root(named: str | os.PathLike[str]) -> Path:
    """The real folder that files read for the reference `named` must lie in (see above)."""
    p = Path(named)
    folder = p if p.is_dir() else p.parent
    real = Path(os.path.realpath(folder))
    parts = real.parts
    for i in range(len(parts) - 2, 0, -1):
        if parts[i] == "snapshots" and parts[i - 1].startswith(_HUB_PREFIXES):
            return Path(*parts[:i])
    return real


def resolve_inside(
    root: str | os.PathLike[str],
    path: str | os.PathLike[str],
    error: type[SpliceError] = CheckpointError,
) -> Path:
    """`path` unchanged if its real location is inside `root`; `error` otherwise."""
    real = os.path.realpath(path)
    base = os.fspath(root).rstrip(os.sep) + os.sep
    if real + os.sep != base and not real.startswith(base):
        raise error(
            f"{path} leads outside {root} (through a link, '..' or an absolute path); splice "
            "reads only files inside the folder named (a Hugging Face cache's models--ORG--NAME "
            "folder for its snapshots)"
        )
    return Path(path)


_KINDS = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def _kind(mode: int) -> str:
    return next((what for test, what in _KINDS if test(mode)), "not a plain file")


def require_regular(
    path: str | os.PathLike[str], error: type[SpliceError] = CheckpointError
) -> os.stat_result:
    """The `stat` of `path` (links followed) when it is a regular file; `error` otherwise."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            raise error(f"{path} is a link to a missing file") from None
        raise error(f"{path} does not exist") from None
    except OSError as e:
        raise error(f"{path}: cannot open: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{path} is {_kind(st.st_mode)}, not a regular file")
    return st


def open_regular(path: str | os.PathLike[str], error: type[SpliceError] = CheckpointError) -> int:
    """A read-only file descriptor on the regular file `path`; the caller closes it.

    Never blocks: the type is checked by `stat` before opening, and again by `fstat` on a
    descriptor opened with O_NONBLOCK (reset to blocking once it is known to be a file).
    """
    require_regular(path, error)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise error(f"{path}: cannot open: {e.strerror}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise error(f"{path} is {_kind(mode)}, not a regular file")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def member(
    folder: str | os.PathLike[str],
    name: str,
    root: str | os.PathLike[str] | None = None,
    error: type[SpliceError] = CheckpointError,
) -> Path | None:
    """`folder/name` checked by rules 2 and 3, or None when nothing is there.

    `root` defaults to `allowed_root(folder)`. A broken link, a link leaving the root and
    anything that is not a regular file are errors, not None.
    """
    path = Path(folder) / name
    if not os.path.lexists(path):
        return None
    resolve_inside(allowed_root(folder) if root is None else root, path, error)
    require_regular(path, error)
    return path


def side_files(folder: str | os.PathLike[str], names: tuple[str, ...] | list[str]) -> list[Path]:
    """The files of `names` present in `folder`, each checked by `member` and opened once
    (`open_regular`), so that a side file a writer copies at the end fails before the first
    tensor is written (errors raise)."""
    root = allowed_root(folder)
    found = [p for name in names if (p := member(folder, name, root)) is not None]
    for p in found:
        os.close(open_regular(p))
    return found


def check_model_folder(
    folder: str | os.PathLike[str], error: type[SpliceError] = CheckpointError
) -> None:
    """Rules 2 and 3 for a folder handed whole to a library (transformers' from_pretrained).

    Every top-level entry must lie inside the folder's root, and every entry that is not a
    folder must be a regular file.
    """
    root = allowed_root(folder)
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as e:
        raise error(f"{folder}: cannot list: {e.strerror}") from None
    for entry in entries:
        resolve_inside(root, entry.path, error)
        if not entry.is_dir():
            require_regular(entry.path, error)


def read_limited(
    path: str | os.PathLike[str],
    limit: int,
    what: str,
    error: type[SpliceError] = CheckpointError,
) -> bytes:
    """The bytes of the regular file `path`; `error` when it holds more than `limit` bytes."""
    fd = open_regular(path, error)
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise error(f"{path} is {size} bytes; a {what} may be at most {limit} bytes")
        chunks, total = [], 0
        while chunk := os.read(fd, min(1 << 24, limit + 1 - total)):
            chunks.append(chunk)
            total += len(chunk)
            if total > limit:
                raise error(f"{path} grew past {limit} bytes while being read (a {what})")
        return b"".join(chunks)
    except OSError as e:
        raise error(f"{path}: cannot read: {e.strerror}") from None
    finally:
        os.close(fd)
