"""Generated blocks of the README: text between ``<!-- NAME:begin -->`` and
``<!-- NAME:end -->`` that a module writes from the code (method and adapter references),
so the docs cannot drift from the registries; tests compare each block with its source."""

from __future__ import annotations

import re
from pathlib import Path


def _pattern(name: str) -> str:
    return rf"<!-- {name}:begin -->\n(.*?)\n?<!-- {name}:end -->"


def read_block(text: str, name: str) -> str | None:
    """The body of block ``name`` in ``text`` (None when the markers are missing)."""
    m = re.search(_pattern(name), text, flags=re.S)
    return m.group(1) if m else None


def update_block(path: str | Path, name: str, body: str) -> None:
    """Replace the body of block ``name`` in the file at ``path``."""
    p = Path(path)
    text = p.read_text(encoding="utf-8")
    if read_block(text, name) is None:
        raise ValueError(f"{p}: no <!-- {name}:begin --> ... <!-- {name}:end --> block")
    block = f"<!-- {name}:begin -->\n{body}\n<!-- {name}:end -->"
    p.write_text(re.sub(_pattern(name), lambda _: block, text, flags=re.S), encoding="utf-8")
