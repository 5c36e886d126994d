"""Reading ``fortune(6)`` data files, shared by the fortune tasks (topic and language).

Format (strfile): plain text, entries separated by a line holding only ``%``; a ``.dat``
index and ``.u8`` symlink sit beside each file (skipped). Files are UTF-8; one that is not
valid UTF-8 is read as latin-1.

Cleaning, per entry:
- whitespace runs (line breaks, the tabs before ``-- Author`` lines) become one space and
  the ends are stripped, so an entry is one line of text;
- entries that are not mostly prose are dropped: fewer than `MIN_LETTERS` letters, or
  letters making up less than `MIN_LETTER_SHARE` of the non-space characters (ASCII art,
  banners, code listings, tables).
"""

from __future__ import annotations

import re
from pathlib import Path

from splice.data.bbc_news import read_text

MIN_LETTERS = 10
MIN_LETTER_SHARE = 0.6
_SEPARATOR = re.compile(r"^%[ \t\r]*$", re.M)
_SPACE = re.compile(r"\s+")


def clean_entry(entry: str) -> str | None:
    """One fortune as one line of text, or None when it is not mostly prose."""
    text = _SPACE.sub(" ", entry).strip()
    solid = text.replace(" ", "")
    letters = sum(ch.isalpha() for ch in solid)
    if letters < MIN_LETTERS or letters < MIN_LETTER_SHARE * len(solid):
        return None
    return text


def read_fortunes(path: Path) -> tuple[list[str], int]:
    """The cleaned entries of one fortune file, in file order, and how many were dropped."""
    kept: list[str] = []
    dropped = 0
    for raw in _SEPARATOR.split(read_text(path)):
        if not raw.strip():
            continue
        text = clean_entry(raw)
        if text is None:
            dropped += 1
        else:
            kept.append(text)
    return kept, dropped


def fortune_files(folder: Path, exclude: tuple[str, ...] = ()) -> list[Path]:
    """The fortune files directly in ``folder``, sorted: regular files (not symlinks), no
    ``.dat`` / ``.u8``, no sub-folders (e.g. the rot13 ``off/`` sections), none in
    ``exclude``."""
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file()
        and not p.is_symlink()
        and p.suffix not in (".dat", ".u8")
        and p.name not in exclude
    )
