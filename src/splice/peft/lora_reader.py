"""Read PEFT LoRA / DoRA adapter folders as typed deltas (`splice.delta`).

`LoraFolder.open(dir)` parses the config (`lora_config`), classifies the saved keys
(`lora_keys`) and keeps the weights file open; tensors are read on demand:

- `delta(module)`: the module's ΔW. LoRA: `LowRank(B, A, scale)` with scale = alpha/r or
  alpha/√r (rsLoRA, rank_pattern / alpha_pattern), ``transposed`` for embeddings and
  fan_in_fan_out (GPT-2's Conv1D). A Conv2d LoRA (PEFT's lora_B out×r×1×1, lora_A
  r×in×kh×kw) is read as B out×r, A r×(in·kh·kw) with ``weight_shape`` (out, in, kh, kw):
  ΔW[o,i,k,l] = s · Σ_r B[o,r] A[r,i,k,l], PEFT's `Conv2d.get_delta_weight` (ungrouped;
  Conv1d and Conv3d alike, one kernel dimension fewer or more).
  DoRA: `Folded("dora", {b, a, magnitude})`, whose W' is m ⊙ (W + ΔW) / ‖W + ΔW‖ per output
  feature (`splice.delta.folded`).
- `bias_delta(module)`: lora_bias's `Dense(scale · lora_B.bias)`, None without one.
- `full`: tensors the adapter saves whole (modules_to_save, trained biases), by base name.

Compute dtype (PEFT's, `autocast_adapter_dtype=True`): half-precision adapter tensors are
upcast to float32, float64 ones stay float64 (`compute_dtype`).

`read_lora_adapter(s)` loads whole adapters as factors for the LoRA-native merges and checks
that they fit together, before any method runs (MergeValidationError / CheckpointError):
every adapter adapts the same modules with the same delta shape, kind (linear or embedding)
and fan_in_fan_out; only plain LoRA factors (no full tensors, no lora_bias); each module's
saved rank is the rank its config gives it. Its factors keep PEFT's stored frame (B out×r,
A r×in, not ``transposed``); `embedding` says which modules are embeddings.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from splice.delta import Dense, Folded, LowRank
from splice.errors import CheckpointError, MergeValidationError
from splice.io.base import CheckpointReader
from splice.io.finite import FiniteReader
from splice.peft.files import open_weights
from splice.peft.lora_config import LoraAdapterConfig, load_lora_config
from splice.peft.lora_keys import LoraModuleKeys, classify_keys


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 when any tensor is float64, else float32 (PEFT upcasts half precisions)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


@dataclass
class LoraFolder:
    """An open PEFT LoRA adapter folder (see the module docstring)."""

    path: Path
    raw_config: dict[str, Any]
    config: LoraAdapterConfig
    weights: CheckpointReader
    modules: dict[str, LoraModuleKeys]
    full: dict[str, str]

    @classmethod
    def open(cls, adapter_dir: str | Path, *, allow_nonfinite: bool = True) -> LoraFolder:
        """Parse and classify; with ``allow_nonfinite`` False a tensor read holding NaN /
        ±inf is a NonFiniteError naming it."""
        path = Path(adapter_dir)
        config, raw = load_lora_config(path)
        weights = open_weights(path)
        if not allow_nonfinite:
            weights = FiniteReader(weights, str(path))
        try:
            modules, full = classify_keys(weights.path, weights.names())
        except BaseException:
            weights.close()
            raise
        return cls(path, raw, config, weights, modules, full)

    def transposed(self, module: str) -> bool:
        """Whether the base weight receives (B A)ᵀ: embeddings and fan_in_fan_out."""
        return self.modules[module].embedding or self.config.fan_in_fan_out

    def delta_shape(self, module: str) -> tuple[int, ...]:
        """The shape of the module's base weight the factors fit (no data read); a
        CheckpointError unless A and B are 2-D (linear, embedding) or a Conv2d pair (B
        out×r×1×1, A r×in×kh×kw; Conv1d / Conv3d alike) with the rank the config gives it."""
        self.check_factors(module)
        keys = self.modules[module]
        assert keys.a is not None and keys.b is not None
        a, b = self.weights.info(keys.a).shape, self.weights.info(keys.b).shape
        if self.transposed(module):
            return (a[1], b[0])
        return (b[0], *a[1:])

    def check_factors(self, module: str) -> None:
        """See `delta_shape`."""
        keys = self.modules[module]
        assert keys.a is not None and keys.b is not None
        a, b = self.weights.info(keys.a).shape, self.weights.info(keys.b).shape
        where = f"{self.weights.path}: module '{module}'"
        conv = len(a) == len(b) >= 3 and all(k == 1 for k in b[2:])
        if not conv and (len(a) != 2 or len(b) != 2):
            raise CheckpointError(
                f"{where}: LoRA factors of shapes {list(a)} and {list(b)}; only linear, "
                "embedding (2-D factors) and convolution LoRA are supported"
            )
        r = self.config.rank_for(module)
        if a[0] != r or b[1] != r:
            raise CheckpointError(
                f"{where}: LoRA shapes A {list(a)}, B {list(b)} do not have the configured "
                f"rank r={r}"
            )

    def delta(self, module: str) -> LowRank | Folded:
        """The module's ΔW: LowRank, or Folded "dora" when it saves a magnitude."""
        keys = self.modules[module]
        assert keys.a is not None and keys.b is not None
        a, b = self.weights.read(keys.a), self.weights.read(keys.b)
        dtype = compute_dtype(a, b)
        shape = (b.shape[0], *a.shape[1:])
        conv = a.dim() > 2  # B out×r×1×1, A r×in×kh×kw: the product reshaped
        a, b = a.to(dtype).flatten(1), b.to(dtype).flatten(1)
        scale, transposed = self.config.scale_for(module), self.transposed(module)
        if keys.magnitude is None:
            return LowRank(b, a, scale, transposed, shape if conv else None)
        out, inn = b.shape[0], a.shape[1]
        return Folded(
            "dora",
            {"b": b, "a": a, "magnitude": self.weights.read(keys.magnitude).to(dtype)},
            shape if conv else (inn, out) if transposed else (out, inn),
            {"transposed": transposed, "lora_scale": scale},
        )

    def bias_delta(self, module: str) -> Dense | None:
        """lora_bias's ΔW of the module's bias, scale · lora_B.bias; None without one."""
        key = self.modules[module].b_bias
        if key is None:
            return None
        bias = self.weights.read(key)
        return Dense(bias.to(compute_dtype(bias)) * self.config.scale_for(module))

    def close(self) -> None:
        self.weights.close()


@dataclass
class LoadedAdapter:
    """One adapter folder: its raw config, parsed config and factors by module key."""

    path: Path
    raw_config: dict[str, Any]
    config: LoraAdapterConfig
    modules: dict[str, LowRank] = field(default_factory=dict)
    embedding: dict[str, bool] = field(default_factory=dict)


def read_lora_adapter(adapter_dir: str | Path, *, allow_nonfinite: bool = False) -> LoadedAdapter:
    """Read one PEFT LoRA adapter folder into factors; a factor holding NaN / ±inf is a
    NonFiniteError naming it unless ``allow_nonfinite``."""
    folder = LoraFolder.open(adapter_dir, allow_nonfinite=allow_nonfinite)
    path = folder.path
    try:
        if folder.full:
            shown = ", ".join(sorted(folder.full)[:3])
            raise MergeValidationError(
                f"{path}: saves full tensors ({shown}); modules_to_save / trained biases cannot "
                "be merged as LoRA factors"
            )
        out = LoadedAdapter(path, folder.raw_config, folder.config)
        for module, keys in sorted(folder.modules.items()):
            if keys.b_bias is not None:
                raise MergeValidationError(
                    f"{path}: module '{module}' has a lora_B bias (lora_bias); not supported here"
                )
            folder.check_factors(module)
            delta = folder.delta(module)
            if isinstance(delta, Folded):
                raise MergeValidationError(
                    f"{path}: module '{module}' is DoRA (lora_magnitude_vector); only plain "
                    "LoRA factors can be merged"
                )
            if delta.weight_shape is not None:
                raise MergeValidationError(
                    f"{path}: module '{module}' is a convolution LoRA; only linear and embedding "
                    "LoRA factors can be merged"
                )
            out.modules[module] = dataclasses.replace(delta, transposed=False)
            out.embedding[module] = keys.embedding
        if not out.modules:
            raise MergeValidationError(f"{path}: the adapter has no LoRA weights")
        return out
    finally:
        folder.close()


def read_lora_adapters(
    adapter_dirs: list[str | Path], *, allow_nonfinite: bool = False
) -> list[LoadedAdapter]:
    """Load and cross-check adapters of the same base; MergeValidationError on a mismatch."""
    if not adapter_dirs:
        raise MergeValidationError("no adapters given")
    adapters = [read_lora_adapter(d, allow_nonfinite=allow_nonfinite) for d in adapter_dirs]
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
