"""Error types. Every user-facing failure is a `SpliceError` with one clear message."""

from __future__ import annotations

import os


class SpliceError(Exception):
    """Base class: the CLI prints the message (traceback only under --debug) and exits 1."""


class CheckpointError(SpliceError):
    """A checkpoint or adapter file is missing, corrupt, truncated or unsafe."""


class RecipeError(SpliceError):
    """A recipe is malformed: unknown keys, bad values, wrong types."""


class MergeValidationError(SpliceError):
    """Inputs do not fit together: names, shapes, dtypes, missing base, bad parameters."""


class DataError(SpliceError):
    """A dataset is missing, malformed, or does not match a saved split."""


def expected_failure(e: BaseException) -> str | None:
    """The one-line message for an expected failure that escaped as a foreign exception,
    else None (a bug: the CLI keeps its traceback).

    Expected: an OS error (``"PATH: <what the OS said>"``), undecodable text, a YAML / JSON
    syntax error, input nested too deeply to parse (RecursionError), an invalid regular
    expression, a CSV format error, and a pydantic validation error. The readers of user
    files turn these into `SpliceError`s naming the file (`splice.io.textfile`); this is the
    net under them, so that no user input reaches the user as a traceback.
    """
    import csv
    import json
    import re

    if isinstance(e, OSError):
        return os_error_message(e)
    if isinstance(e, UnicodeDecodeError):
        return f"input is not valid UTF-8 text ({e.reason} at offset {e.start})"
    if isinstance(e, json.JSONDecodeError):
        return f"not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})"
    if isinstance(e, RecursionError):
        return "input nested too deeply to process"
    if isinstance(e, re.error):
        return f"invalid regular expression {e.pattern!r}: {e.msg}"
    if isinstance(e, csv.Error):
        return f"malformed CSV: {e}"
    yaml_error = _yaml_error(e)
    if yaml_error is not None:
        return yaml_error
    return _validation_error(e)


def _yaml_error(e: BaseException) -> str | None:
    import sys

    yaml = sys.modules.get("yaml")  # not imported: cannot be a YAML error
    if yaml is None or not isinstance(e, yaml.YAMLError):
        return None
    if isinstance(e, yaml.MarkedYAMLError) and e.problem_mark is not None:
        m = e.problem_mark
        return f"not valid YAML: {e.problem} (line {m.line + 1}, column {m.column + 1})"
    return f"not valid YAML: {type(e).__name__}"


def _validation_error(e: BaseException) -> str | None:
    import sys

    pydantic = sys.modules.get("pydantic")
    if pydantic is None or not isinstance(e, pydantic.ValidationError):
        return None
    err = e.errors()[0]
    loc = ".".join(str(p) for p in err["loc"]) or e.title
    more = f" (and {e.error_count() - 1} more)" if e.error_count() > 1 else ""
    return f"invalid {e.title}: '{loc}': {err['msg']}{more}"


def os_error_message(e: OSError, path: str | os.PathLike[str] | None = None) -> str:
    """``"PATH: strerror"`` (both paths for a two-path error such as a rename)."""
    name = path if path is not None else e.filename
    reason = e.strerror or str(e) or type(e).__name__
    if isinstance(e, IsADirectoryError):
        reason = "is a folder, not a file"
    if name is None:
        return reason
    if e.filename2 is not None and path is None:
        return f"{name} -> {e.filename2}: {reason}"
    return f"{name}: {reason}"
