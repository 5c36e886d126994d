"""Where a served adapter's folder is: named adapters and adapter roots, nothing else.

An adapter name resolves, in this order, to

1. a folder registered under that name at runtime (``/v1/load_lora_adapter``),
2. a folder named on the command line or in the config (``--adapter NAME=PATH``: the
   operator chose the path, it is used as given),
3. the subfolder ``NAME`` of the first adapter root (``--adapter-root DIR``) that holds one.

A name is one path component of letters, digits, ``_`` and ``-`` (AdapterModel's names), so
``../x``, ``/etc`` or ``a/b`` never reach the file system. A runtime ``lora_path`` may be
relative to a root or absolute, but it must contain no ``..`` component and its real location
(every link followed) must lie inside a root, checked with `splice.io.safe_paths`: a link
inside a root that points out of it is refused like ``../``. The adapter's own files are then
read by `splice.peft.files`, which keeps every file inside the adapter folder.
"""

from __future__ import annotations

import os
from pathlib import Path

from splice.errors import SpliceError
from splice.io.safe_paths import resolve_inside
from splice.peft.files import CONFIG_NAME
from splice.serve.config import ADAPTER_NAME_RE


class AdapterPathError(SpliceError):
    """An adapter name or path the server refuses (unknown, or outside the roots)."""


class UnknownAdapterError(AdapterPathError):
    """No configured adapter or root subfolder has this name."""


class AdapterSources:
    def __init__(self, named: dict[str, str], roots: list[str]) -> None:
        self.named = {name: Path(path) for name, path in named.items()}
        self.roots = [Path(os.path.realpath(r)) for r in roots]
        for given, real in zip(roots, self.roots, strict=True):
            if not real.is_dir():
                raise AdapterPathError(f"adapter root {given} is not a folder")
        self.runtime: dict[str, Path] = {}

    @staticmethod
    def check_name(name: str) -> None:
        if not isinstance(name, str) or not ADAPTER_NAME_RE.fullmatch(name):
            raise AdapterPathError(
                f"adapter name {name!r}: use one name of letters, digits, '_' or '-' (no paths)"
            )

    def resolve(self, name: str) -> Path:
        """The folder of adapter ``name`` (see the module docstring)."""
        self.check_name(name)
        if name in self.runtime:
            return self.runtime[name]
        if name in self.named:
            return self.named[name]
        for root in self.roots:
            candidate = root / name
            if os.path.lexists(candidate):
                resolve_inside(root, candidate, AdapterPathError)
                return candidate
        raise UnknownAdapterError(f"the model '{name}' does not exist")

    def resolve_path(self, lora_path: str) -> Path:
        """A runtime ``lora_path``: inside an adapter root, or an error."""
        if not self.roots:
            raise AdapterPathError(
                "loading adapters at runtime needs an adapter root (--adapter-root)"
            )
        if not lora_path or "\x00" in lora_path:
            raise AdapterPathError("lora_path is empty or holds a NUL character")
        if ".." in Path(lora_path).parts:
            raise AdapterPathError(f"lora_path {lora_path!r}: '..' is not allowed")
        given = Path(lora_path)
        candidates = [given] if given.is_absolute() else [r / given for r in self.roots]
        for candidate in candidates:
            if not os.path.lexists(candidate):
                continue
            real = os.path.realpath(candidate)
            for root in self.roots:
                if real == str(root) or real.startswith(str(root) + os.sep):
                    return candidate
            if not given.is_absolute():  # a link inside a root that leads out of it
                resolve_inside(self.roots[0], candidate, AdapterPathError)
            raise AdapterPathError(
                f"lora_path {lora_path!r} lies outside the adapter roots (through a link or "
                "an absolute path); the server reads adapters only inside --adapter-root folders"
            )
        raise AdapterPathError(f"lora_path {lora_path!r}: no such folder in the adapter roots")

    def available(self) -> list[str]:
        """Every adapter name a request may use: runtime, configured, and the root subfolders
        holding an adapter_config.json (with a valid name), sorted, without repeats."""
        names = set(self.runtime) | set(self.named)
        for root in self.roots:
            try:
                entries = list(os.scandir(root))
            except OSError:
                continue
            for entry in entries:
                real = os.path.realpath(entry.path)
                if (
                    ADAPTER_NAME_RE.fullmatch(entry.name)
                    and real.startswith(str(root) + os.sep)
                    and os.path.isfile(os.path.join(real, CONFIG_NAME))
                ):
                    names.add(entry.name)
        return sorted(names)
