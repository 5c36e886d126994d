"""Checking a composition block against a model and making it the active setup.

``am.set_active(block)`` calls `activate`, which checks everything before any compute, each
failure one `CompositionError` line:

- every name is an adapter of the model ("did you mean"), none is a model-level adapter
  (prompt / prefix tuning: they rewrite the model's inputs, not a layer's output) and none is
  folded into the weights (an Average or Fuse needs the adapter's own output);
- a Fuse names a fusion on the model (``am.add_fusion``) over the same children, and its
  children adapt the same layers.

Then, by what the block equals:

- a Stack of names is ``am.set_active([names])``, the several-active forward (no second
  implementation);
- an Average of names is a mixed batch whose every row is the weighted set
  (`splice.adapters.mixed_batch`), run by ``am.composition``;
- anything else sets a `LayerComposition` on each adapted layer the block touches.

``am.set_active(names)`` (a name or a list) later replaces the block, and so does adding an
adapter with ``activate=True`` or deleting one of the block's adapters.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from splice.compose.blocks import Average, Block, CompositionError, Fuse, Stack
from splice.compose.blocks_forward import ActiveComposition, LayerComposition
from splice.config_errors import did_you_mean

if TYPE_CHECKING:
    from splice.adapters.model import AdapterModel


def check_names(am: AdapterModel, block: Block) -> None:
    """Every adapter the block names exists, acts on layers, and is not folded."""
    for name in block.names():
        if name not in am.configs:
            known = ", ".join(am.configs) or "none"
            raise CompositionError(
                f"{block!r}: no adapter named {name!r}{did_you_mean(name, am.configs)}; "
                f"adapters: {known}"
            )
        if name in am.model_adapters:
            raise CompositionError(
                f"{block!r}: adapter {name!r} ({am.configs[name].method}) is a model-level "
                "adapter (it rewrites the model's inputs): composition blocks take layer "
                "adapters"
            )
        for path, layer in am.adapted_layers():
            if name in layer.folded:
                raise CompositionError(
                    f"{block!r}: adapter {name!r} is folded into '{path}'; unfold it first"
                )


def resolve_fusions(am: AdapterModel, node: str | Block) -> str | Block:
    """The block with every ``Fuse(name=...)`` given its children from the model's fusion,
    each Fuse checked against the fusion of its name."""
    if isinstance(node, str):
        return node
    children = tuple(resolve_fusions(am, c) for c in node.children)
    if isinstance(node, Fuse):
        if node.name not in am.fusions:
            known = ", ".join(am.fusions) or "none"
            raise CompositionError(
                f"no fusion named {node.name!r}{did_you_mean(node.name, am.fusions)} (fusions: "
                f"{known}); add one with am.add_fusion(Fuse(..., name={node.name!r})) or "
                "load it with splice.compose.load_fusion"
            )
        fusion = am.fusions[node.name]
        if not children:
            return fusion.block
        if children != fusion.block.children:
            raise CompositionError(
                f"{node!r}: fusion {node.name!r} was added over {list(fusion.block.children)}"
            )
        return fusion.block
    if isinstance(node, Average):
        return Average(*children, weights=node.weights, normalize_weights=False)
    return type(node)(*children)


def clear(am: AdapterModel) -> None:
    """No block active (the layers run their active adapters)."""
    am.composition = None
    for _, layer in am.adapted_layers():
        layer.composition = None


def activate(am: AdapterModel, block: Block) -> None:
    """Check ``block`` against ``am`` and make it the active setup (module docstring)."""
    resolved = resolve_fusions(am, block)
    assert isinstance(resolved, Block)
    check_names(am, resolved)
    for node in resolved.blocks():
        if isinstance(node, Fuse):
            from splice.compose.fusion import fused_layers

            fused_layers(am, node)  # same layers for every child
    if isinstance(resolved, Stack) and resolved.names_only():
        am.set_active(list(resolved.children))  # clears any block
        return
    names = resolved.names()
    am.set_active([])  # clears any block and the layers' active lists
    am.active = names
    if isinstance(resolved, Average) and resolved.names_only():
        rows = dict(zip(resolved.children, resolved.weights, strict=True))
        am.composition = ActiveComposition(resolved, rows=rows)  # type: ignore[arg-type]
        for _, layer in am.adapted_layers():
            layer.active = [n for n in names if n in layer.adapters]
        return
    am.composition = ActiveComposition(resolved)
    fuses = [b for b in resolved.blocks() if isinstance(b, Fuse)]
    for path, layer in am.adapted_layers():
        present = [n for n in names if n in layer.adapters]
        layer.active = present
        if not present:
            continue
        fusions = {}
        for fuse in fuses:
            at = am.fusions[fuse.name].layer_at(path)
            if at is not None:
                fusions[fuse.name] = at
        layer.composition = LayerComposition(resolved, fusions)
