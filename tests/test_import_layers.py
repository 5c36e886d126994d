"""The subpackages of splice import each other without a cycle (top-level and function-level
imports alike): each layer depends only on the ones below it."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import splice


def _package_graph() -> dict[str, set[str]]:
    root = Path(splice.__file__).parent
    graph: dict[str, set[str]] = defaultdict(set)
    for f in root.rglob("*.py"):
        parts = f.relative_to(root.parent).with_suffix("").parts
        here = ".".join(parts[:2]) if parts[-1] != "__init__" or len(parts) > 2 else parts[0]
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("splice."):
                there = ".".join(node.module.split(".")[:2])
                if there != here:
                    graph[here].add(there)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found: list[list[str]] = []
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                found.append([*path[path.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt, path)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    return found


def test_no_import_cycle_between_subpackages():
    assert _cycles(_package_graph()) == []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


# The README's layer table ("Development"), lowest first: a subpackage imports only from its
# own row or the rows before it. Top-level modules not listed (demo, inspect_ckpt,
# readme_blocks) are helpers of the CLI and the README test.
LAYERS = [
    {"errors", "numbers", "config_errors"},
    {"io"},
    {"delta"},
    {"peft"},
    {"recipe", "merge"},
    {"adapters"},
    {"reference"},
    {"engine"},
    {"lora_merge", "compress", "compose"},
    {"train", "data", "bench", "serve"},
    {"commands", "cli", "demo"},
]


def test_subpackages_import_only_their_layer_or_lower():
    rank = {f"splice.{m}": i for i, row in enumerate(LAYERS) for m in row}
    upward = [
        (a, b)
        for a, targets in _package_graph().items()
        for b in targets
        if a in rank and b in rank and rank[b] > rank[a]
    ]
    assert upward == []
    listed = {m for row in LAYERS for m in row}
    root = Path(splice.__file__).parent
    packages = {p.name for p in root.iterdir() if (p / "__init__.py").exists()}
    assert packages <= listed, packages - listed
