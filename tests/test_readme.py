"""The README's generated references must stay equal to the registries they come from."""

from pathlib import Path

import pytest

from splice.adapters.reference import adapter_table
from splice.merge.reference import method_table
from splice.readme_blocks import read_block, update_block

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.parametrize(
    ("name", "table", "refresh"),
    [
        ("methods", method_table, "python -m splice.merge.reference"),
        ("adapters", adapter_table, "python -m splice.adapters.reference"),
    ],
)
def test_readme_block_matches_registry(name, table, refresh):
    body = read_block(README.read_text(encoding="utf-8"), name)
    assert body is not None, f"README lacks the {name} block"
    assert body.strip() == table().strip(), f"README {name} block is stale: run `{refresh}`"


def test_update_block_replaces_only_the_body(tmp_path):
    p = tmp_path / "R.md"
    p.write_text("a\n<!-- x:begin -->\nold\n<!-- x:end -->\nb\n", encoding="utf-8")
    update_block(p, "x", "new\nlines")
    assert p.read_text(encoding="utf-8") == "a\n<!-- x:begin -->\nnew\nlines\n<!-- x:end -->\nb\n"
    with pytest.raises(ValueError, match="no <!-- y:begin"):
        update_block(p, "y", "z")
