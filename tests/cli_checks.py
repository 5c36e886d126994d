"""Shared checks of the no-traceback tests: a CLI run that fails cleanly, no output left."""

from __future__ import annotations

from pathlib import Path

import pytest

from splice.cli import main

# Nesting deeper than any parser's recursion limit.
DEEP_YAML = "a: " + "[" * 3000 + "]" * 3000 + "\n"
DEEP_JSON = "[" * 100_000 + "]" * 100_000


def fails_cleanly(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run the CLI; it must fail with exactly one `splice: error:` line, no traceback."""
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 1, (argv, err)
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("splice: error:")]
    assert len(lines) == 1, err
    assert len(lines[0]) < 600, lines[0]  # one line, not a dump of the input
    return err


def no_output(*paths: Path) -> None:
    for p in paths:
        assert not p.exists(), f"{p} was left behind"
        partial = p.with_name(p.name + ".splice-partial")
        assert not partial.exists(), f"{partial} was left behind"
