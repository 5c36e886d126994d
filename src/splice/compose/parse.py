"""The YAML / dict form of a composition: one parser, strict, one-line errors with the path.

    a                                   an adapter name (alone)
    {stack: [a, b]}                     Stack("a", "b")
    {parallel: [a, {stack: [b, c]}]}    Parallel("a", Stack("b", "c"))
    {average: {a: 0.7, b: 0.3}}         Average("a", "b", weights=[0.7, 0.3]) (normalized)
    {average: [a, {stack: [b, c]}]}     equal weights; children may be blocks
    {average: {children: [a, b], weights: [2, 1], normalize_weights: false}}
    {fuse: fusion_ab}                   the fusion named fusion_ab on the model (its adapters)
    {fuse: [a, b]}                      Fuse("a", "b") (name "a,b", as AdapterHub)
    {fuse: {name: fusion_ab, adapters: [a, b]}}

A block is a mapping with exactly one key (the block's name, lower case). Nesting follows
AdapterHub's rules (`splice.compose.blocks`); the block constructors check them, so a parsed
composition is a valid one. `Block.to_dict` writes this form back.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from splice.compose.blocks import BLOCKS, Average, Block, CompositionError, Fuse
from splice.config_errors import did_you_mean

_AVERAGE_KEYS = ("children", "weights", "normalize_weights")
_FUSE_KEYS = ("name", "adapters")


def parse_composition(data: Any, where: str = "composition") -> str | Block:
    """A composition from its dict / YAML form (module docstring)."""
    try:
        return _parse(data, where)
    except CompositionError as e:
        msg = str(e)
        raise CompositionError(msg if msg.startswith(where) else f"{where}: {msg}") from None


def _parse(data: Any, where: str) -> str | Block:
    if isinstance(data, str):
        if not data:
            raise CompositionError(f"{where}: an empty adapter name")
        return data
    if not isinstance(data, Mapping):
        raise CompositionError(
            f"{where}: expected an adapter name or a block ({{stack: [...]}}, {{parallel: "
            f"[...]}}, {{average: ...}}, {{fuse: ...}}), got {_kind(data)}"
        )
    if len(data) != 1:
        keys = ", ".join(map(str, data)) or "none"
        raise CompositionError(f"{where}: a block is a mapping with one key, got keys {keys}")
    ((key, value),) = data.items()
    if key not in BLOCKS:
        raise CompositionError(
            f"{where}: unknown block {key!r}{did_you_mean(str(key), BLOCKS)}; blocks: "
            f"{', '.join(BLOCKS)}"
        )
    here = f"{where}.{key}"
    if key == "average":
        return _average(value, here)
    if key == "fuse":
        return _fuse(value, here)
    return BLOCKS[key](*_children(value, here))


def _children(value: Any, where: str) -> list[str | Block]:
    if not isinstance(value, list):
        raise CompositionError(f"{where}: expected a list of adapters, got {_kind(value)}")
    return [_parse(v, f"{where}[{i}]") for i, v in enumerate(value)]


def _average(value: Any, where: str) -> Average:
    if isinstance(value, list):
        return Average(*_children(value, where))
    if not isinstance(value, Mapping):
        raise CompositionError(
            f"{where}: expected {{adapter: weight, ...}} or a list, got {_kind(value)}"
        )
    if "children" in value:
        _keys(value, _AVERAGE_KEYS, where)
        normalize = value.get("normalize_weights", True)
        if not isinstance(normalize, bool):
            raise CompositionError(f"{where}.normalize_weights: expected true or false")
        weights = value.get("weights")
        if weights is not None and not isinstance(weights, list):
            raise CompositionError(f"{where}.weights: expected a list of numbers")
        kids = _children(value["children"], f"{where}.children")
        return Average(*kids, weights=weights, normalize_weights=normalize)
    for name in value:
        if not isinstance(name, str):
            raise CompositionError(f"{where}: adapter names are strings, got {name!r}")
    return Average(*value.keys(), weights=list(value.values()))


def _fuse(value: Any, where: str) -> Fuse:
    if isinstance(value, str):
        if not value:
            raise CompositionError(f"{where}: an empty fusion name")
        return Fuse(name=value)
    if isinstance(value, list):
        return Fuse(*_children(value, where))
    if not isinstance(value, Mapping):
        raise CompositionError(
            f"{where}: expected a fusion name, a list of adapters or {{name:, adapters:}}, "
            f"got {_kind(value)}"
        )
    _keys(value, _FUSE_KEYS, where)
    name = value.get("name")
    if name is not None and not isinstance(name, str):
        raise CompositionError(f"{where}.name: expected a string")
    if "adapters" not in value:
        if not name:
            raise CompositionError(f"{where}: give a name or adapters")
        return Fuse(name=name)
    return Fuse(*_children(value["adapters"], f"{where}.adapters"), name=name)


def _keys(value: Mapping, allowed: tuple[str, ...], where: str) -> None:
    for k in value:
        if k not in allowed:
            raise CompositionError(
                f"{where}: unknown key {k!r}{did_you_mean(str(k), allowed)}; keys: "
                f"{', '.join(allowed)}"
            )


def _kind(value: Any) -> str:
    return {list: "a list", bool: "a boolean", type(None): "null"}.get(
        type(value), f"a {type(value).__name__}"
    )
