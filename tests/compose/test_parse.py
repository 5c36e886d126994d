"""The YAML / dict form of a composition: each form, nesting, round trips, strict errors."""

from __future__ import annotations

import pytest
import yaml

from splice.compose import Average, CompositionError, Fuse, Parallel, Stack, parse_composition


@pytest.mark.parametrize(
    ("text", "block"),
    [
        ("a", "a"),
        ("{stack: [a, b]}", Stack("a", "b")),
        ("{parallel: [a, {stack: [b, c]}]}", Parallel("a", Stack("b", "c"))),
        ("{average: {a: 0.75, b: 0.25}}", Average("a", "b", weights=[0.75, 0.25])),
        ("{average: {a: 3, b: 1}}", Average("a", "b", weights=[0.75, 0.25])),
        ("{average: [a, {stack: [b, c]}]}", Average("a", Stack("b", "c"))),
        (
            "{average: {children: [a, b], weights: [2, 1], normalize_weights: false}}",
            Average("a", "b", weights=[2, 1], normalize_weights=False),
        ),
        ("{fuse: fusion_ab}", Fuse(name="fusion_ab")),
        ("{fuse: [a, b]}", Fuse("a", "b", name="a,b")),
        ("{fuse: {name: f, adapters: [a, {stack: [b, c]}]}}", Fuse("a", Stack("b", "c"), name="f")),
        (
            "{stack: [lang, {fuse: {name: f, adapters: [a, b]}}]}",
            Stack("lang", Fuse("a", "b", name="f")),
        ),
    ],
)
def test_forms(text, block):
    got = parse_composition(yaml.safe_load(text))
    assert got == block
    assert type(got) is type(block)
    if not isinstance(block, str):
        assert parse_composition(block.to_dict()) == block  # to_dict round trip


def test_weights_are_kept():
    got = parse_composition({"average": {"a": 0.75, "b": 0.25}})
    assert got.weights == (0.75, 0.25)
    assert got != Average("a", "b")  # weights are part of the value


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"stak": ["a"]}, r"composition: unknown block 'stak' \(did you mean 'stack'"),
        ({"stack": ["a"], "fuse": "f"}, "a mapping with one key, got keys stack, fuse"),
        ({"stack": "a"}, r"composition.stack: expected a list of adapters, got a str"),
        ({"stack": ["a", 3]}, r"composition.stack\[1\]: expected an adapter name or a block"),
        ({"stack": ["a", {"stack": ["b"]}]}, "Stack cannot hold a Stack"),
        ({"average": {"a": "x"}}, "weight 'x' is not a finite number"),
        ({"average": {"children": ["a"], "weigths": [1]}}, r"unknown key 'weigths' \(did"),
        ({"average": 3}, "expected {adapter: weight, ...} or a list, got a int"),
        ({"fuse": {"nme": "f"}}, r"unknown key 'nme' \(did you mean 'name'"),
        ({"fuse": ""}, "an empty fusion name"),
        (None, "expected an adapter name or a block"),
        ({"parallel": []}, "needs at least one adapter"),
    ],
)
def test_errors_name_the_path(data, message):
    with pytest.raises(CompositionError, match=message):
        parse_composition(data)
