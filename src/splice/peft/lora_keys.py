"""PEFT LoRA saved key names, in both directions.

Saved keys carry the prefix `base_model.model.` and no adapter name (`files.saved_key`):
`<module>.lora_A.weight`, `<module>.lora_B.weight`, `<module>.lora_B.bias` (lora_bias),
`<module>.lora_embedding_A`, `<module>.lora_embedding_B` (embeddings),
`<module>.lora_magnitude_vector` (DoRA, with use_dora); any other key is a full tensor
(modules_to_save, trained biases, an embedding's `base_layer.weight` saved for resized
vocabularies) that replaces the base tensor of the same name once `.base_layer` is removed.
`classify_keys` reads names, `factor_keys` writes them.
"""

from __future__ import annotations

from dataclasses import dataclass

from splice.errors import CheckpointError
from splice.peft.files import SAVED_PREFIX, saved_key

_LORA_SUFFIXES = {
    ".lora_A.weight": ("a", False),
    ".lora_B.weight": ("b", False),
    ".lora_B.bias": ("b_bias", False),
    ".lora_embedding_A": ("a", True),
    ".lora_embedding_B": ("b", True),
}
_MAGNITUDE_SUFFIX = ".lora_magnitude_vector"  # DoRA: linear or embedding, told by its A/B keys


@dataclass
class LoraModuleKeys:
    """The saved keys of one LoRA-adapted module."""

    module: str
    embedding: bool = False
    a: str | None = None
    b: str | None = None
    b_bias: str | None = None
    magnitude: str | None = None  # DoRA's lora_magnitude_vector


def factor_keys(module: str, embedding: bool) -> tuple[str, str]:
    """The saved keys (A, B) of `module`'s LoRA factors."""
    if embedding:
        return saved_key(module, "lora_embedding_A"), saved_key(module, "lora_embedding_B")
    return saved_key(module, "lora_A.weight"), saved_key(module, "lora_B.weight")


def classify_keys(path: str, keys: list[str]) -> tuple[dict[str, LoraModuleKeys], dict[str, str]]:
    """Split saved keys into LoRA modules and full tensors.

    Returns ({module key: its LoRA keys}, {base tensor name: saved key}) with the
    `base_model.model.` prefix removed and `.base_layer` dropped from full-tensor names.
    """
    modules: dict[str, LoraModuleKeys] = {}
    full: dict[str, str] = {}
    magnitudes: dict[str, str] = {}
    for key in keys:
        rel = key.removeprefix(SAVED_PREFIX)
        if rel.endswith(_MAGNITUDE_SUFFIX):
            magnitudes[rel[: -len(_MAGNITUDE_SUFFIX)]] = key
            continue
        for suffix, (slot, embedding) in _LORA_SUFFIXES.items():
            if rel.endswith(suffix):
                module = rel[: -len(suffix)]
                entry = modules.setdefault(module, LoraModuleKeys(module, embedding))
                if entry.embedding != embedding:
                    raise CheckpointError(
                        f"{path}: module '{module}' mixes linear and embedding LoRA keys"
                    )
                setattr(entry, slot, key)
                break
        else:
            if "lora_" in rel:
                raise CheckpointError(
                    f"{path}: key '{key}' is not a plain LoRA key (lora_A/lora_B weights or "
                    "lora_embedding_A/B); this adapter type is not supported yet"
                )
            name = rel.replace(".base_layer.", ".")
            if name in full:
                raise CheckpointError(f"{path}: keys '{full[name]}' and '{key}' both save '{name}'")
            full[name] = key
    for module, key in magnitudes.items():
        if module not in modules:
            raise CheckpointError(f"{path}: DoRA magnitude '{key}' has no lora_A/lora_B weights")
        modules[module].magnitude = key
    for entry in modules.values():
        if entry.a is None or entry.b is None:
            half = "lora_A" if entry.a is None else "lora_B"
            raise CheckpointError(f"{path}: module '{entry.module}' has no {half} weight")
    return modules, full
