"""The README's method reference is generated from the registry and must stay equal to it."""

import re
from pathlib import Path

from splice.merge.reference import method_table

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_method_table_matches_registry():
    text = README.read_text(encoding="utf-8")
    m = re.search(r"<!-- methods:begin -->\n(.*?)\n<!-- methods:end -->", text, re.S)
    assert m, "README lacks the methods block"
    assert m.group(1).strip() == method_table().strip(), (
        "README method table is stale: run `python -m splice.merge.reference` to refresh it"
    )


def test_readme_adapter_table_matches_registry():
    from splice.adapters.reference import adapter_table

    text = README.read_text(encoding="utf-8")
    m = re.search(r"<!-- adapters:begin -->\n(.*?)\n<!-- adapters:end -->", text, re.S)
    assert m, "README lacks the adapters block"
    assert m.group(1).strip() == adapter_table().strip(), (
        "README adapter table is stale: run `python -m splice.adapters.reference` to refresh it"
    )
