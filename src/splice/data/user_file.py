"""User data: a CSV/TSV or JSON Lines file with a text column and a label column.

Formats, chosen by extension: ``.csv`` (comma), ``.tsv`` (tab), ``.jsonl`` / ``.ndjson``
(one JSON object per line; blank lines skipped). Files are UTF-8 (a BOM is accepted). Other
columns are ignored. A CSV field may hold up to `MAX_FIELD_CHARS` characters (16 Mi; the
csv module's own default is 128 Ki).

Labels (the classes are the labels present in the file, never a range):
- integer labels (JSON integers, or strings of digits such as CSV's ``"0"``, ``"1"``): the
  classes are the distinct integers present, sorted numerically, named by their decimal
  strings; the id of a label is its position in that order. So labels 0 and 10**12 are two
  classes, ``"0"`` and ``"1000000000000"``, with ids 0 and 1. They must be >= 0;
- any other labels are strings: the class names are the distinct strings, sorted, and the
  id of a label is its position in that order.
JSON floats, booleans, nulls, lists and objects are rejected as labels. At most
`MAX_CLASSES` distinct labels (`splice.data.dataset`).

Errors (`DataError`, one line, before any heavy work): unknown extension, unreadable file,
undecodable bytes (with the byte offset), empty file, a CSV format error or a JSON Lines
line that is not a JSON object (with its line number), a missing column (the columns found
are listed), an empty text or label (with its line number), fewer than two distinct
classes, more than `MAX_CLASSES`. Duplicate texts are kept unless ``dedupe=True``.
"""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path
from typing import Any

from splice.data.dataset import MAX_CLASSES, TextClassificationDataset, from_pairs
from splice.errors import DataError
from splice.io.textfile import parse_json, read_text

SUFFIXES = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl"}
_INT = re.compile(r"[+-]?\d+")


MAX_FIELD_CHARS = 16 * 1024 * 1024


def _rows_csv(path: Path, delimiter: str) -> tuple[list[str], list[tuple[int, dict[str, Any]]]]:
    text = read_text(path, DataError, limit=None)
    old_limit = csv.field_size_limit(MAX_FIELD_CHARS)
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        columns = list(reader.fieldnames or [])
        rows = [(reader.line_num, row) for row in reader]
    except csv.Error as e:
        raise DataError(f"{path} line {reader.reader.line_num}: not valid CSV ({e})") from None
    finally:
        csv.field_size_limit(old_limit)
    return columns, rows


def _rows_jsonl(path: Path) -> tuple[list[str], list[tuple[int, dict[str, Any]]]]:
    rows: list[tuple[int, dict[str, Any]]] = []
    columns: dict[str, None] = {}
    for number, line in enumerate(io.StringIO(read_text(path, DataError, limit=None)), 1):
        if not line.strip():
            continue
        obj = parse_json(line, f"{path} line {number}", DataError)
        if not isinstance(obj, dict):
            raise DataError(f"{path} line {number}: expected a JSON object")
        columns.update(dict.fromkeys(obj))
        rows.append((number, obj))
    return list(columns), rows


def read_rows(path: Path) -> tuple[list[str], list[tuple[int, dict[str, Any]]]]:
    """(columns, [(line number, row)]) of a .csv / .tsv / .jsonl / .ndjson file."""
    kind = SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise DataError(
            f"{path}: unknown data file type {path.suffix!r}; use one of {sorted(SUFFIXES)}"
        )
    if kind == "jsonl":
        return _rows_jsonl(path)
    return _rows_csv(path, "\t" if kind == "tsv" else ",")


def _label_ids(raw: list[tuple[int, Any]], path: Path) -> tuple[list[int], list[str]]:
    """Class ids and names from raw labels (see the module docstring)."""
    for number, value in raw:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise DataError(f"{path} line {number}: label {value!r} must be a string or an integer")
    keys: list[int | str]
    if all(isinstance(v, int) or _INT.fullmatch(v.strip()) for _, v in raw):
        keys = [int(v) for _, v in raw]
        neg = next(((n, v) for (n, v), k in zip(raw, keys) if int(k) < 0), None)
        if neg is not None:
            raise DataError(f"{path} line {neg[0]}: integer label {neg[1]!r} is negative")
    else:
        keys = [str(v).strip() for _, v in raw]
    distinct = sorted(set(keys))  # type: ignore[type-var]
    if len(distinct) > MAX_CLASSES:
        raise DataError(
            f"{path}: {len(distinct):,} distinct labels; at most {MAX_CLASSES:,} classes "
            "are supported (is the label column right?)"
        )
    index = {k: i for i, k in enumerate(distinct)}
    return [index[k] for k in keys], [str(k) for k in distinct]


def load_user_file(
    path: str | Path,
    *,
    text_column: str = "text",
    label_column: str = "label",
    dedupe: bool = False,
) -> TextClassificationDataset:
    """Load a labeled text file (CSV, TSV or JSON Lines)."""
    path = Path(path)
    if path.suffix.lower() not in SUFFIXES:
        raise DataError(
            f"{path}: unknown data file type {path.suffix!r}; use one of {sorted(SUFFIXES)}"
        )
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if path.is_file() and path.stat().st_size == 0:
        raise DataError(f"{path}: the file is empty")
    columns, rows = read_rows(path)
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
