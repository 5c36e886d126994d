"""Adapter names and runtime paths resolve only inside the configured roots: no `..`, no
absolute names, no links out."""

from __future__ import annotations

import os

import pytest

from splice.serve.adapter_sources import AdapterPathError, AdapterSources, UnknownAdapterError


@pytest.fixture
def layout(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    for d in (root / "good", root / "nested" / "deep", outside / "evil"):
        d.mkdir(parents=True)
        (d / "adapter_config.json").write_text("{}")
    (root / "notes").mkdir()  # no adapter_config.json: not listed
    os.symlink(outside / "evil", root / "link_out")
    os.symlink(root / "good", root / "link_in")
    return root, outside


def test_names_resolve_in_order(layout, tmp_path):
    root = layout[0]
    named = tmp_path / "named"
    named.mkdir()
    src = AdapterSources({"mine": str(named), "good": str(named)}, [str(root)])
    assert src.resolve("mine") == named
    assert src.resolve("good") == named  # a configured name before a root subfolder
    assert src.resolve("link_in") == root.resolve() / "link_in"  # a link staying inside
    src.runtime["good"] = root / "nested" / "deep"
    assert src.resolve("good") == root / "nested" / "deep"  # runtime first
    with pytest.raises(UnknownAdapterError):
        src.resolve("missing")
    assert src.available() == ["good", "link_in", "mine"]


@pytest.mark.parametrize("name", ["../outside/evil", "/etc", "a/b", "..", "", "x y", "é"])
def test_names_are_one_plain_component(layout, name):
    src = AdapterSources({}, [str(layout[0])])
    with pytest.raises(AdapterPathError, match="no paths"):
        src.resolve(name)


def test_link_out_of_a_root_is_refused(layout):
    src = AdapterSources({}, [str(layout[0])])
    with pytest.raises(AdapterPathError, match="leads outside"):
        src.resolve("link_out")


def test_runtime_paths(layout):
    root, outside = layout
    src = AdapterSources({}, [str(root)])
    assert src.resolve_path("nested/deep") == root.resolve() / "nested" / "deep"
    assert src.resolve_path(str(root / "good")) == root / "good"  # absolute, inside
    for bad, message in [
        ("../outside/evil", "'..' is not allowed"),
        ("nested/../../outside/evil", "'..' is not allowed"),
        (str(outside / "evil"), "outside the adapter roots"),
        ("link_out", "leads outside"),
        ("nope", "no such folder"),
        ("", "empty"),
    ]:
        with pytest.raises(AdapterPathError) as e:
            src.resolve_path(bad)
        assert message in str(e.value), bad
    with pytest.raises(AdapterPathError, match="needs an adapter root"):
        AdapterSources({}, []).resolve_path("good")
