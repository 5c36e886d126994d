"""Where an output folder may go, and which existing folder `--overwrite` may replace.

Location rule (`check_out_location`, run before any heavy work): `--out` must name a new or
existing *folder* that is not the filesystem root, the current folder or one of its parents
(`.`, `..`, `/`), not an existing file (or a link to one), and not under a file; the nearest
existing ancestor must be a folder this process may write in. Anything else is one clear
`CheckpointError`. (Whether the filesystem really takes writes, read-only mounts included, is
found when the lock file is created, still before any heavy work.)

Overwrite rule (`overwrite_refusal`), by the number of `--overwrite` flags:

- 0: an existing `--out` is refused;
- 1: it is replaced only when it is empty, or a previous splice output (it carries
  `MARKER_NAME`, written into every output folder) that holds no input of this run;
- 2 (`--overwrite --overwrite`): any existing folder is replaced.

Permission rule (`permission_mask`): output files get at most the permission bits of the most
restrictive input (each input file, the regular files directly inside each input folder, and
the input folder itself without its search bits), so 0600 inputs give 0600 outputs (folders
0700); without inputs the umask alone decides.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from splice.errors import CheckpointError

MARKER_NAME = "splice_output.json"
"""Written into every output folder; marks a folder a single --overwrite may replace."""


def check_out_location(out: str | os.PathLike[str]) -> Path:
    """The absolute output path (its parent's links resolved); CheckpointError if unusable."""
    text = os.fspath(out)
    if not text.strip():
        raise CheckpointError("the output path is empty")
    if Path(text).name in ("", ".", ".."):
        raise CheckpointError(
            f"output '{text}' names an existing folder of the path itself (., .. or /); "
            "give a new folder for the output, e.g. ./merged"
        )
    absolute = Path(os.path.abspath(text))
    path = absolute.parent.resolve() / absolute.name
    try:
        here = Path.cwd().resolve()
    except OSError:
        here = None
    if here is not None and (path.resolve() == here or path.resolve() in here.parents):
        raise CheckpointError(
            f"output '{text}' is the current folder or one of its parents; give a new folder "
            "for the output"
        )
    if path.exists() or path.is_symlink():
        if not path.is_dir():
            raise CheckpointError(f"output {text} exists and is not a folder")
        return path
    _check_creatable(path, text)
    return path


def existing_ancestor(path: Path) -> Path:
    """The nearest ancestor of ``path`` that exists (the filesystem root at the latest): where
    creating ``path`` would start; a file there means ``path`` cannot be created."""
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    return ancestor


def _check_creatable(path: Path, text: str) -> None:
    """The nearest existing ancestor of `path` must be a folder this process may write in."""
    ancestor = existing_ancestor(path)
    if not ancestor.is_dir():
        raise CheckpointError(
            f"cannot create the output {text}: {ancestor} is a file, not a folder"
        )
    if not os.access(ancestor, os.W_OK | os.X_OK):
        if os.statvfs(ancestor).f_flag & os.ST_RDONLY:
            why = f"{ancestor} is on a read-only file system"
        else:
            why = f"no write permission in {ancestor}"
        raise CheckpointError(f"cannot create the output {text}: {why}")


def prepare_work_folder(out: str | os.PathLike[str]) -> Path:
    """Create (if needed) a work folder that commands fill file by file (bench, demo reports):
    any existing folder, `.` included, is fine; a file, a path under a file or an unwritable
    place is one clear CheckpointError."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"output {out} exists and is not a folder")
    if not path.exists():
        _check_creatable(Path(os.path.abspath(path)), os.fspath(out))
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".splice-probe-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise CheckpointError(f"cannot write in the output folder {out}: {e.strerror}") from e
    return path


def input_paths(refs: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Resolved paths of the inputs behind model references (`BASE+ADAPTER` gives both, by
    `split_reference`); references that do not exist are left out (their readers report them)."""
    from splice.io.open import split_reference

    out: list[Path] = []
    for ref in refs:
        try:
            parts = [p for p in split_reference(ref) if p is not None]
        except CheckpointError:
            continue
        for part in parts:
            p = Path(part).resolve()
            if p not in out:
                out.append(p)
    return out


def permission_mask(inputs: Iterable[Path]) -> int:
    """The permission bits output files may have at most (see the module docstring)."""
    mask = 0o777
    for p in inputs:
        try:
            st = p.stat()
            if p.is_dir():
                mask &= (st.st_mode & 0o666) | 0o111
                for f in p.iterdir():
                    if f.is_file():
                        mask &= f.stat().st_mode & 0o777
            else:
                mask &= st.st_mode & 0o777
        except OSError:
            continue
    return mask


def folder_mask(file_mask: int) -> int:
    """A folder's bits for a file mask: search (x) wherever reading (r) is allowed."""
    return file_mask | ((file_mask & 0o444) >> 2)


def overwrite_refusal(out: Path, shown: str, level: int, inputs: Iterable[Path]) -> str | None:
    """Why the existing folder at `out` may not be replaced at this `--overwrite` level."""
    if not (out.exists() or out.is_symlink()):
        return None
    if not out.is_dir():
        return f"output {shown} exists and is not a folder"
    if level <= 0:
        return (
            f"output folder {shown} already exists; choose another path or allow "
            "overwriting it (--overwrite)"
        )
    if level >= 2:
        return None
    twice = "give --overwrite twice (--overwrite --overwrite) to replace it anyway"
    real = out.resolve()
    for p in inputs:
        if p == real or real in p.parents:
            return f"output folder {shown} holds an input of this run ({p}); {twice}"
    try:
        empty = not any(out.iterdir())
        marked = (out / MARKER_NAME).is_file()
    except OSError as e:
        return f"output folder {shown} cannot be read ({e.strerror})"
    if empty or marked:
        return None
    return (
        f"output folder {shown} was not written by splice (it has no {MARKER_NAME}); "
        f"--overwrite replaces only splice outputs: {twice}"
    )
