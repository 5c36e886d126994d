"""Load N PEFT LoRA adapters of one base as factors, checking that they fit together.

Each adapter folder is read with `splice.io.peft_adapter` (config, key names, scale =
alpha/r or alpha/√r with rsLoRA, rank_pattern / alpha_pattern). Every target becomes a
`LowRank(B, A, scale)` in float32 (float64 adapters stay float64).

Checks, all before any method runs (MergeValidationError / CheckpointError, one line):
- every adapter adapts the same modules, each with the same delta shape and kind (linear or
  embedding) and the same fan_in_fan_out;
- only plain LoRA factors: full tensors (modules_to_save, trained biases) and lora_bias cannot
  be merged in factor form and are refused;
- each module's saved rank equals the rank its config gives it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from splice.delta import LowRank
from splice.errors import CheckpointError, MergeValidationError
from splice.io.finite import FiniteReader
from splice.io.peft_adapter import (
    LoraAdapterConfig,
    classify_keys,
    load_lora_config,
    open_adapter_weights,
    read_lora_config_json,
)


@dataclass
class LoadedAdapter:
    """One adapter folder: its raw config, parsed config and factors by module key."""

    path: Path
    raw_config: dict[str, Any]
    config: LoraAdapterConfig
    modules: dict[str, LowRank] = field(default_factory=dict)
    embedding: dict[str, bool] = field(default_factory=dict)


def _compute(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float64 else t.float()


def load_adapter(adapter_dir: str | Path, *, allow_nonfinite: bool = False) -> LoadedAdapter:
    """Read one PEFT LoRA adapter folder into factors; a factor holding NaN / ±inf is a
    NonFiniteError naming it unless ``allow_nonfinite``."""
    path = Path(adapter_dir)
    config = load_lora_config(path)
    _, raw = read_lora_config_json(path)
    reader = open_adapter_weights(path)
    if not allow_nonfinite:
        reader = FiniteReader(reader, str(path))
    try:
        modules, full = classify_keys(reader.path, reader.names())
        if full:
            shown = ", ".join(sorted(full)[:3])
            raise MergeValidationError(
                f"{path}: saves full tensors ({shown}); modules_to_save / trained biases cannot "
                "be merged as LoRA factors"
            )
        out = LoadedAdapter(path, raw, config)
        for module, keys in sorted(modules.items()):
            assert keys.a is not None and keys.b is not None
            if keys.b_bias is not None:
                raise MergeValidationError(
                    f"{path}: module '{module}' has a lora_B bias (lora_bias); not supported here"
                )
            a, b = _compute(reader.read(keys.a)), _compute(reader.read(keys.b))
            if a.dim() != 2 or b.dim() != 2:
                raise MergeValidationError(
                    f"{path}: module '{module}': factors of shapes {list(b.shape)}, "
                    f"{list(a.shape)}; only linear and embedding LoRA (2-D factors)"
                )
            r = config.rank_for(module)
            if a.shape[0] != r or b.shape[1] != r:
                raise CheckpointError(
                    f"{path}: module '{module}': A {list(a.shape)}, B {list(b.shape)} do not "
                    f"have the configured rank r={r}"
                )
            out.modules[module] = LowRank(b, a, config.scale_for(module))
            out.embedding[module] = keys.embedding
        if not out.modules:
            raise MergeValidationError(f"{path}: the adapter has no LoRA weights")
        return out
    finally:
        reader.close()


def load_adapters(
    adapter_dirs: list[str | Path], *, allow_nonfinite: bool = False
) -> list[LoadedAdapter]:
    """Load and cross-check adapters of the same base; MergeValidationError on a mismatch."""
    if not adapter_dirs:
        raise MergeValidationError("no adapters given")
    adapters = [load_adapter(d, allow_nonfinite=allow_nonfinite) for d in adapter_dirs]
    first = adapters[0]
    for other in adapters[1:]:
        mine, theirs = set(first.modules), set(other.modules)
        if mine != theirs:
            diff = sorted(mine ^ theirs)
            raise MergeValidationError(
                f"{other.path} and {first.path} adapt different modules "
                f"({len(diff)} differ, e.g. '{diff[0]}'); LoRA merging needs the same targets"
            )
        if other.config.fan_in_fan_out != first.config.fan_in_fan_out:
            raise MergeValidationError(
                f"{other.path}: fan_in_fan_out differs from {first.path}; not the same base layout"
            )
        for module, f in first.modules.items():
            g = other.modules[module]
            if g.shape != f.shape or other.embedding[module] != first.embedding[module]:
                raise MergeValidationError(
                    f"{other.path}: module '{module}' has delta shape {list(g.shape)}, "
                    f"{first.path} has {list(f.shape)}; adapters of different bases?"
                )
    return adapters
