"""Composition blocks: Stack, Parallel, Average, Fuse (AdapterHub's names and nesting rules).

    am.set_active(Stack("lang", "task"))                    # in sequence
    am.set_active(Average("a", "b", weights=[0.7, 0.3]))    # weighted average of outputs
    am.set_active(Parallel("a", "b"))                       # one output per adapter
    am.add_fusion(Fuse("a", "b", name="fusion_ab"))         # then train it (splice train)
    am.set_active(Fuse("a", "b", name="fusion_ab"))

A block is a plain, immutable description: a tuple of children, each an adapter name or a
nested block. What a block computes at one adapted layer (its semantics, and where they
differ from AdapterHub's ``adapters`` library) is in `splice.compose.blocks_forward`;
checks against a model and activation in `splice.compose.blocks_activate`; AdapterFusion in
`splice.compose.fusion`; the YAML / dict form in `splice.compose.parse`.

Nesting (AdapterHub's ``ALLOWED_NESTINGS`` for these four blocks, and its depth rule):

    Stack    children: name, Fuse, Parallel, Average
    Fuse     children: name, Stack
    Parallel children: name, Stack, Average
    Average  children: name, Stack

A Stack nested in another block holds names only (AdapterHub refuses a Stack at depth >= 1
with block children), Parallel stands at the top or directly in the top-level Stack, and a
composition holds at most one Parallel. A block has at least one child and names no child
twice. All of this is checked when the block is built: a bad block never exists.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, ClassVar

from splice.errors import SpliceError

if TYPE_CHECKING:
    from splice.adapters.model import AdapterModel


class CompositionError(SpliceError):
    """A composition block is malformed or does not fit the model (before any compute)."""


class Block:
    """A composition block: ``children`` (names or blocks), checked at construction."""

    allowed: ClassVar[tuple[str, ...]] = ()
    children: tuple[str | Block, ...]

    def __init__(self, *children: str | Block) -> None:
        if len(children) == 1 and isinstance(children[0], list | tuple):
            children = tuple(children[0])  # Stack(["a", "b"]) as Stack("a", "b")
        self.children = tuple(children)
        self._check_children()

    # -- structure ---------------------------------------------------------------------------

    @property
    def kind(self) -> str:
        return type(self).__name__

    def _check_children(self) -> None:
        if not self.children:
            raise CompositionError(f"{self.kind}: needs at least one adapter")
        seen: list[str] = []
        for c in self.children:
            if isinstance(c, str):
                if not c:
                    raise CompositionError(f"{self.kind}: an empty adapter name")
                if c in seen:
                    raise CompositionError(f"{self.kind}: adapter {c!r} named twice")
                seen.append(c)
            elif isinstance(c, Block):
                if c.kind not in self.allowed:
                    raise CompositionError(
                        f"{self.kind} cannot hold {_article(c.kind)} {c.kind} (it holds "
                        "adapter names"
                        f"{''.join(', ' + a for a in self.allowed)})"
                    )
                if isinstance(c, Stack) and any(isinstance(g, Block) for g in c.children):
                    raise CompositionError(
                        f"a Stack inside {self.kind} holds adapter names only (too deep)"
                    )
            else:
                raise CompositionError(
                    f"{self.kind}: a child must be an adapter name or a block, got "
                    f"{type(c).__name__}"
                )
        parallels = sum(1 for b in self.blocks() if isinstance(b, Parallel))
        if parallels > 1:
            raise CompositionError("a composition holds at most one Parallel")

    def blocks(self) -> Iterator[Block]:
        """This block and every nested block, depth first."""
        yield self
        for c in self.children:
            if isinstance(c, Block):
                yield from c.blocks()

    def names(self) -> list[str]:
        """The adapter names in the composition, in order of first appearance."""
        out: list[str] = []
        for c in self.children:
            for n in [c] if isinstance(c, str) else c.names():
                if n not in out:
                    out.append(n)
        return out

    @property
    def channels(self) -> int:
        """How many outputs a forward returns: Parallel's children count, else 1."""
        return max((len(b.children) for b in self.blocks() if isinstance(b, Parallel)), default=1)

    def names_only(self) -> bool:
        return all(isinstance(c, str) for c in self.children)

    # -- dict form (`splice.compose.parse` reads it back) ------------------------------------

    def to_dict(self) -> dict[str, Any]:
        key = self.kind.lower()
        return {key: [c if isinstance(c, str) else c.to_dict() for c in self.children]}

    # -- on a model --------------------------------------------------------------------------

    def activate(self, am: AdapterModel) -> None:
        """Check the composition against ``am`` and make it the active setup (what
        ``am.set_active(block)`` calls)."""
        from splice.compose.blocks_activate import activate

        activate(am, self)

    def add_to(self, am: AdapterModel, config: Any = None) -> None:
        raise CompositionError(f"{self.kind} has no trained parameters: only Fuse is added")

    # -- value semantics ---------------------------------------------------------------------

    def _key(self) -> tuple[Any, ...]:
        return (self.kind, self.children)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Block) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return f"{self.kind}({', '.join(repr(c) for c in self.children)})"


class Stack(Block):
    """Adapters applied in sequence: each child acts on the output of the one before."""

    allowed = ("Fuse", "Parallel", "Average")


class Parallel(Block):
    """Each child on its own copy of the input; the forward returns one output per child."""

    allowed = ("Stack", "Average")


class Average(Block):
    """The weighted average of the children's outputs at each adapted layer.

    ``weights`` default to 1/N each; with ``normalize_weights`` (default, as AdapterHub) they
    are divided by their sum (which must then not be 0)."""

    allowed = ("Stack",)

    def __init__(
        self,
        *children: str | Block,
        weights: list[float] | tuple[float, ...] | None = None,
        normalize_weights: bool = True,
    ) -> None:
        super().__init__(*children)
        n = len(self.children)
        if weights is None:
            w = [1.0 / n] * n
        else:
            w = list(weights)
            if len(w) != n:
                raise CompositionError(f"Average: {len(w)} weights for {n} adapters")
            for x in w:
                if isinstance(x, bool) or not isinstance(x, int | float) or not math.isfinite(x):
                    raise CompositionError(f"Average: weight {x!r} is not a finite number")
            w = [float(x) for x in w]
            if normalize_weights:
                total = sum(w)
                if total == 0:
                    raise CompositionError("Average: the weights sum to 0 (cannot normalize)")
                w = [x / total for x in w]
        self.weights = tuple(w)

    def to_dict(self) -> dict[str, Any]:
        if self.names_only() and sum(self.weights) == 1.0:  # reads back unchanged
            return {"average": dict(zip(self.children, self.weights, strict=True))}
        kids = super().to_dict()["average"]
        weights = list(self.weights)
        return {"average": {"children": kids, "weights": weights, "normalize_weights": False}}

    def _key(self) -> tuple[Any, ...]:
        return (*super()._key(), self.weights)

    def __repr__(self) -> str:
        kids = ", ".join(repr(c) for c in self.children)
        return f"Average({kids}, weights={list(self.weights)})"


class Fuse(Block):
    """AdapterFusion over the children (frozen adapters): a trained attention per adapted
    layer (`splice.compose.fusion`). ``name`` names the fusion's parameters (added with
    ``am.add_fusion(Fuse(...))``); it defaults to the children's names joined by ",", as in
    AdapterHub. ``Fuse(name="f")`` with no children refers to the fusion ``f`` already on the
    model (its children are read from it at activation)."""

    allowed = ("Stack",)

    def __init__(self, *children: str | Block, name: str | None = None) -> None:
        if not children and name:
            self.children = ()
            self.name = name
            return
        super().__init__(*children)
        self.name = name or ",".join(
            c if isinstance(c, str) else c.names()[-1] for c in self.children
        )
        if not self.name:
            raise CompositionError("Fuse: an empty fusion name")

    @property
    def resolved(self) -> bool:
        return bool(self.children)

    def to_dict(self) -> dict[str, Any]:
        kids = [c if isinstance(c, str) else c.to_dict() for c in self.children]
        return {"fuse": {"name": self.name, "adapters": kids}}

    def add_to(self, am: AdapterModel, config: Any = None) -> None:
        from splice.compose.fusion import add_fusion

        add_fusion(am, self, config)

    def _key(self) -> tuple[Any, ...]:
        return (*super()._key(), self.name)

    def __repr__(self) -> str:
        kids = "".join(f"{c!r}, " for c in self.children)
        return f"Fuse({kids}name={self.name!r})"


BLOCKS: dict[str, type[Block]] = {
    "stack": Stack,
    "parallel": Parallel,
    "average": Average,
    "fuse": Fuse,
}


def _article(word: str) -> str:
    return "an" if word[0].lower() in "aeiou" else "a"
