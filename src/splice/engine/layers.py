"""Layers are found by tensor name: a path segment ``layers|h|layer|blocks|block`` followed by
an index (``model.layers.3.mlp...``, ``transformer.h.3...``, ``encoder.layer.3...``), the
first such segment of the name. Used for layer stacking (``slices``), layer gradients and
LiNeS' depth scaling."""

from __future__ import annotations

import re

LAYER_RE = re.compile(r"(?:(?<=\.)|^)(layers|h|layer|blocks|block)\.(\d+)(?=\.)")


def layer_index(name: str) -> int | None:
    """The layer index in a tensor name, None for a tensor outside the layers."""
    m = LAYER_RE.search(name)
    return int(m.group(2)) if m else None


def rename_layer(name: str, new_index: int) -> str:
    """The name with its layer index replaced by ``new_index``."""
    return LAYER_RE.sub(lambda m: f"{m.group(1)}.{new_index}", name, count=1)
