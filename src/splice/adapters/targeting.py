"""Which modules of a model an adapter wraps (PEFT's matching rules).

A module is named by its dotted path in the model as the user passed it
(``model.layers.0.self_attn.q_proj``); layers already wrapped by splice are named by their
original path (the wrapper's internals are invisible).
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from torch import nn

from splice.adapters.config import AdapterConfigError
from splice.peft.lora_config import module_matches

__all__ = ["find_targets", "linear_features", "matches"]

ALL_LINEAR = "all-linear"


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2 style ``Conv1D`` (transformers): a linear layer with weight stored (in, out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def linear_features(module: nn.Module) -> tuple[int, int, bool] | None:
    """(in, out, transposed) of an nn.Linear or a GPT-2 Conv1D (weight stored in×out:
    transposed); None for any other module."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features, False
    if is_conv1d(module):
        n_in, n_out = module.weight.shape
        return n_in, n_out, True
    return None


# PEFT's rules: a string is a full-match regex; a list matches ``name == t`` or
# ``name.endswith('.' + t)`` (`splice.peft.lora_config`, with rank_pattern / alpha_pattern).
matches = module_matches


def named_base_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(path, module) for every module, seeing through splice wrappers: a wrapped layer is
    reported under its own path as its base layer; adapter internals are skipped."""
    from splice.adapters.layer import AdaptedLayer

    def walk(prefix: str, module: nn.Module) -> Iterator[tuple[str, nn.Module]]:
        if isinstance(module, AdaptedLayer):
            yield from walk(prefix, module.base_layer)
            return
        yield prefix, module
        for child_name, child in module.named_children():
            yield from walk(f"{prefix}.{child_name}" if prefix else child_name, child)

    yield from walk("", model)


def output_layer_names(model: nn.Module) -> set[str]:
    """The model's output head (excluded from "all-linear", as PEFT does)."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    from splice.adapters.layer import AdaptedLayer

    names = set()
    for name, module in model.named_modules():
        if isinstance(module, AdaptedLayer):
            module = module.base_layer
        if head is not None and module is head:
            names.add(name.removesuffix(".base_layer"))
    return names


def find_targets(
    model: nn.Module,
    target_modules: list[str] | str | None,
    exclude_modules: list[str] | str | None = None,
) -> list[str]:
    """Paths of the modules selected by target_modules minus exclude_modules."""
    if target_modules is None:
        raise AdapterConfigError("target_modules is not set")
    if isinstance(target_modules, list) and not target_modules:
        raise AdapterConfigError("target_modules is empty")
    if isinstance(target_modules, str) and target_modules != ALL_LINEAR:
        try:
            re.compile(target_modules)
        except re.error as e:
            raise AdapterConfigError(f"target_modules: bad regex {target_modules!r}: {e}") from None
    out = []
    heads = output_layer_names(model) if target_modules == ALL_LINEAR else set()
    for name, module in named_base_modules(model):
        if not name:
            continue
        if target_modules == ALL_LINEAR:
            hit = is_linear(module) and name not in heads
        else:
            hit = matches(target_modules, name)
        if hit and not (exclude_modules and matches(exclude_modules, name)):
            out.append(name)
    return out


def get_submodule(model: nn.Module, path: str) -> nn.Module:
    return model.get_submodule(path)


def set_submodule(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, new)


def suggest_names(model: nn.Module, limit: int = 12) -> str:
    """Leaf-module names of the model, for an error message."""
    leaves = sorted(
        {
            name.rsplit(".", 1)[-1]
            for name, m in named_base_modules(model)
            if name and not list(m.children())
        }
    )
    more = "" if len(leaves) <= limit else f", ... ({len(leaves)} in all)"
    return ", ".join(leaves[:limit]) + more
