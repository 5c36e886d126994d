"""Fortune-cookie topic, 10 classes, from the Debian package ``fortunes`` (fortune-mod data).

Source: ``/usr/share/games/fortunes/<category>``, one ``fortune(6)`` file per category
(format and cleaning: `splice.data.fortune_file`). Quotations, jokes, epigrams and short
anecdotes. The ten topical categories used, with their entries in fortunes 1:1.99.1-7.3
before cleaning: art 465, computers 1,051, education 203, food 198, law 206,
literature 262, love 150, politics 703, science 625, sports 147 (4,010 in all). The other
files are not topics (cookie, fortunes, miscellaneous, people, wisdom, zippy...) or are
too small (medicine 74, pets 52).

Labels: the category names in the order above (art = 0 ... sports = 9). Texts: one entry
with its attribution line (``-- Author``), whitespace collapsed. Duplicate entries (the
same quotation filed twice) are dropped by default (``dedupe``; one filed under two
categories is dropped from both). Classes are uneven (sports 147 vs computers 1,051):
`splice.data.make_splits`' per-class caps balance the splits.

License of the source: BSD (fortune-mod, The Regents of the University of California;
Debian copyright of ``fortunes``); the quotations' authors hold their own words.
"""

from __future__ import annotations

from pathlib import Path

from splice.data.dataset import SourceMissingError, TextClassificationDataset, from_pairs
from splice.data.fortune_file import read_fortunes

NAME = "fortune_topic"
DEFAULT_ROOT = Path("/usr/share/games/fortunes")
INSTALL = "apt-get install -y fortunes  (or: bash scripts/install_data.sh)"
CATEGORIES = (
    "art",
    "computers",
    "education",
    "food",
    "law",
    "literature",
    "love",
    "politics",
    "science",
    "sports",
)


def find_source(root: str | Path | None = None) -> Path:
    """The folder holding the category files (default ``/usr/share/games/fortunes``)."""
    folder = Path(root if root is not None else DEFAULT_ROOT)
    missing = [c for c in CATEGORIES if not (folder / c).is_file()]
    if missing:
        raise SourceMissingError(
            f"{NAME}: Debian package 'fortunes' is not installed (no {folder / missing[0]}); "
            f"install it with: {INSTALL}"
        )
    return folder


def load_fortune_topic(
    root: str | Path | None = None, *, dedupe: bool = True
) -> TextClassificationDataset:
    """Load the ten category files; ``root`` is the folder holding them."""
    folder = find_source(root)
    pairs: list[tuple[str, int]] = []
    dropped = 0
    for label, category in enumerate(CATEGORIES):
        texts, n_dropped = read_fortunes(folder / category)
        dropped += n_dropped
        pairs.extend((text, label) for text in texts)
    info = {"path": str(folder), "not_prose_dropped": dropped}
    return from_pairs(pairs, CATEGORIES, NAME, dedupe=dedupe, info=info)
