"""User data: a CSV/TSV or JSON Lines file with a text column and a label column.

Formats, chosen by extension: ``.csv`` (comma), ``.tsv`` (tab), ``.jsonl`` / ``.ndjson``
(one JSON object per line; blank lines skipped). Files are UTF-8 (a BOM is accepted). Other
columns are ignored.

Labels:
- integer labels (JSON integers, or strings of digits such as CSV's ``"0"``, ``"1"``) are
  used as the class ids as given, with names ``"0" .. str(max)``; they must be >= 0;
- any other labels are strings: the class names are the distinct strings, sorted, and the
  id of a label is its position in that order.
JSON floats, booleans, nulls, lists and objects are rejected as labels.

Errors (`DataError`, one line, before any heavy work): unknown extension, empty file, a
missing column (the columns found are listed), an empty text or label (with its line
number), fewer than two distinct classes. Duplicate texts are kept unless ``dedupe=True``.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import Any

from splice.data.dataset import TextClassificationDataset, from_pairs
from splice.errors import DataError

SUFFIXES = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl"}
_INT = re.compile(r"[+-]?\d+")


def _rows_csv(path: Path, delimiter: str) -> tuple[list[str], list[tuple[int, dict[str, Any]]]]:
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        columns = list(reader.fieldnames or [])
        rows = [(reader.line_num, row) for row in reader]
    return columns, rows


def _rows_jsonl(path: Path) -> tuple[list[str], list[tuple[int, dict[str, Any]]]]:
    rows: list[tuple[int, dict[str, Any]]] = []
    columns: dict[str, None] = {}
    with open(path, encoding="utf-8-sig") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path} line {number}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path} line {number}: expected a JSON object")
            columns.update(dict.fromkeys(obj))
            rows.append((number, obj))
    return list(columns), rows


def _label_ids(raw: list[tuple[int, Any]], path: Path) -> tuple[list[int], list[str]]:
    """Class ids and names from raw labels (see the module docstring)."""
    for number, value in raw:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise DataError(f"{path} line {number}: label {value!r} must be a string or an integer")
    if all(isinstance(v, int) or _INT.fullmatch(v.strip()) for _, v in raw):
        ids = [int(v) for _, v in raw]
        neg = next(((n, v) for (n, v), i in zip(raw, ids) if i < 0), None)
        if neg is not None:
            raise DataError(f"{path} line {neg[0]}: integer label {neg[1]!r} is negative")
        return ids, [str(i) for i in range(max(ids) + 1)]
    names = sorted({str(v).strip() for _, v in raw})
    index = {name: i for i, name in enumerate(names)}
    return [index[str(v).strip()] for _, v in raw], names


def load_user_file(
    path: str | Path,
    *,
    text_column: str = "text",
    label_column: str = "label",
    dedupe: bool = False,
) -> TextClassificationDataset:
    """Load a labeled text file (CSV, TSV or JSON Lines)."""
    path = Path(path)
    kind = SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise DataError(
            f"{path}: unknown data file type {path.suffix!r}; use one of {sorted(SUFFIXES)}"
        )
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: the file is empty")
    if kind == "jsonl":
        columns, rows = _rows_jsonl(path)
    else:
        columns, rows = _rows_csv(path, "\t" if kind == "tsv" else ",")
    if not rows:
        raise DataError(f"{path}: no examples (only a header or blank lines)")
    for col in (text_column, label_column):
        if col not in columns:
            raise DataError(f"{path}: no {col!r} column (columns found: {columns})")
    texts: list[str] = []
    raw_labels: list[tuple[int, Any]] = []
    for number, row in rows:
        text, label = row.get(text_column), row.get(label_column)
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{path} line {number}: empty or missing {text_column!r}")
        if label is None or (isinstance(label, str) and not label.strip()):
            raise DataError(f"{path} line {number}: empty or missing {label_column!r}")
        texts.append(text.strip())
        raw_labels.append((number, label))
    ids, names = _label_ids(raw_labels, path)
    present = sorted({names[i] for i in ids})
    if len(present) < 2:
        raise DataError(f"{path}: only one class ({present[0]!r}); a classifier needs at least two")
    info = {"path": str(path)}
    return from_pairs(zip(texts, ids), names, path.stem, dedupe=dedupe, info=info)
