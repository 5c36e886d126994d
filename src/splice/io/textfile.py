"""Reading the text files a user hands splice: one-line errors, never a traceback.

Every text file splice reads (recipes, `splice train` / `splice bench` configs, CSV / TSV /
JSON Lines data, a model's ``config.json``, adapter and store side files) goes through
`read_text`, and YAML / JSON through `load_yaml` / `load_json` (or `parse_yaml` /
`parse_json` for text that is not a file, such as a ``--param`` value). The policy:

- The file is opened through `splice.io.safe_paths.read_limited`: a regular file only (a
  FIFO or device is refused, never opened), at most ``limit`` bytes (`MAX_TEXT_BYTES` for a
  recipe or config, no bound for a data file the caller reads whole anyway).
- The file is read whole as UTF-8; a leading byte-order mark is accepted and dropped.
- A missing file is ``"PATH does not exist"``, a folder or FIFO ``"PATH is a folder, not a
  regular file"``, any other OS error ``"PATH: cannot open: <what the OS said>"`` (or
  ``cannot read``).
- Undecodable bytes are ``"PATH is not valid UTF-8 text (invalid byte at offset 123, line 4)"``
  (the offset counts bytes from the start of the file, the BOM included).
- A YAML or JSON syntax error names the line and column and the parser's problem.
- Nesting deeper than `MAX_DEPTH` levels (or deep enough to exhaust Python's recursion
  limit while parsing) is an error: no config or recipe is anywhere near that deep, and the
  bound keeps every later walk over the parsed value safe.
- Messages never quote the file's contents (not even the offending byte).

Each function takes the `SpliceError` subclass to raise (``RecipeError``, ``DataError``,
...), so callers keep their own error family.
"""

from __future__ import annotations

import json
import os
from typing import Any

from splice.errors import SpliceError
from splice.io.safe_paths import read_limited

MAX_DEPTH = 100
MAX_TEXT_BYTES = 100_000_000
"""Recipes, configs, indexes and adapter configs are far smaller; a larger one is refused."""
_BOM = b"\xef\xbb\xbf"


def decode_error_message(path: str | os.PathLike[str], e: UnicodeDecodeError, skip: int) -> str:
    """``"PATH is not valid UTF-8 text (invalid byte at offset N, line L)"``."""
    raw = e.object
    offset = skip + e.start
    line = 1 + bytes(raw[: e.start]).count(b"\n") if isinstance(raw, (bytes, bytearray)) else None
    where = f", line {line}" if line is not None else ""
    return f"{path} is not valid UTF-8 text (invalid byte at offset {offset}{where})"


def decode_utf8(data: bytes, where: str, error: type[SpliceError] = SpliceError) -> str:
    """``data`` as UTF-8 text (a BOM dropped), or ``error`` naming ``where``."""
    skip = len(_BOM) if data.startswith(_BOM) else 0
    try:
        return data[skip:].decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(decode_error_message(where, e, skip)) from None


def read_text(
    path: str | os.PathLike[str],
    error: type[SpliceError] = SpliceError,
    limit: int | None = MAX_TEXT_BYTES,
) -> str:
    """The whole regular file as text, at most ``limit`` bytes (None: no bound); see the
    module docstring for the errors."""
    data = read_limited(path, limit if limit is not None else 1 << 62, "text file", error)
    return decode_utf8(data, str(path), error)


def check_depth(value: Any, where: str, error: type[SpliceError] = SpliceError) -> Any:
    """``value`` unchanged, or ``error`` if lists / mappings nest deeper than `MAX_DEPTH`.

    Iterative, so it is itself safe on any depth. YAML aliases can share a node between
    many parents (and even make a cycle, which is infinitely deep): a node is walked again
    only when reached at a greater depth than before, so the work stays bounded by
    nodes x `MAX_DEPTH`."""
    deepest: dict[int, int] = {}
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        node, depth = stack.pop()
        if not isinstance(node, (dict, list)) or deepest.get(id(node), -1) >= depth:
            continue
        if depth >= MAX_DEPTH:
            raise error(f"{where}: nested more than {MAX_DEPTH} levels deep")
        deepest[id(node)] = depth
        children = node.values() if isinstance(node, dict) else node
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    return value


def parse_yaml(text: str, where: str, error: type[SpliceError] = SpliceError) -> Any:
    """``yaml.safe_load(text)`` with one-line errors naming ``where``."""
    import yaml

    try:
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = e.problem or e.context or "syntax error"
        raise error(f"{where}: not valid YAML: {problem}{at}") from None
    except yaml.YAMLError as e:
        raise error(f"{where}: not valid YAML: {type(e).__name__}") from None
    except RecursionError:
        raise error(f"{where}: nested more than {MAX_DEPTH} levels deep") from None
    return check_depth(data, where, error)


def parse_json(text: str, where: str, error: type[SpliceError] = SpliceError) -> Any:
    """``json.loads(text)`` with one-line errors naming ``where``."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        at = f"line {e.lineno}, column {e.colno}" if "\n" in text.strip() else f"column {e.colno}"
        raise error(f"{where}: not valid JSON: {e.msg} ({at})") from None
    except RecursionError:
        raise error(f"{where}: nested more than {MAX_DEPTH} levels deep") from None
    return check_depth(data, where, error)


def load_yaml(path: str | os.PathLike[str], error: type[SpliceError] = SpliceError) -> Any:
    """A YAML file's value (None for an empty file)."""
    return parse_yaml(read_text(path, error), str(path), error)


def load_json(path: str | os.PathLike[str], error: type[SpliceError] = SpliceError) -> Any:
    """A JSON file's value."""
    return parse_json(read_text(path, error), str(path), error)


def load_json_object(
    path: str | os.PathLike[str], error: type[SpliceError] = SpliceError
) -> dict[str, Any]:
    """A JSON file whose value must be an object (a ``config.json``, an adapter config)."""
    data = load_json(path, error)
    if not isinstance(data, dict):
        raise error(f"{path}: expected a JSON object, got {_kind(data)}")
    return data


def _kind(value: Any) -> str:
    return {list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), f"a {type(value).__name__}"
    )
