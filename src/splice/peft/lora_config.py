"""A PEFT LoRA `adapter_config.json`: the fields that decide the adapter's deltas.

The matching rules follow PEFT (peft 0.21, `peft/tuners/tuners_utils.py` and
`peft/utils/other.py`), where a module key is the module's dotted path in the wrapped model,
e.g. `model.layers.0.self_attn.q_proj`:

- target_modules: a string is a regex that must `re.fullmatch` the key; a list matches a key
  equal to an entry or ending in `.` + entry; "all-linear" matches every linear layer.
  exclude_modules follows the same rule and wins. (layers_to_transform is not re-checked: a
  saved LoRA key already says which layers were adapted.)
- rank_pattern / alpha_pattern: the first pattern key (in the JSON's order) for which
  `re.match(rf"(.*\\.)?({pattern})$", key)` succeeds gives that module's r / lora_alpha.
- scale = lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora.

The saved key names are in `lora_keys`, the files in `files`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from splice.errors import CheckpointError
from splice.io.safe_paths import shown
from splice.numbers import check_number, is_finite_number
from splice.peft.files import read_config

# Config fields that select a LoRA variant whose merge is not base + scale * B @ A, or that
# change which parameters are adapted; an adapter using any of them is refused.
_UNSUPPORTED: dict[str, str] = {
    "use_qalora": "QALoRA (use_qalora)",
    "use_bdlora": "BD-LoRA (use_bdlora)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "arrow_config": "Arrow routing (arrow_config)",
    "velora_config": "VeLoRA (velora_config)",
    "monteclora_config": "MonteCLoRA (monteclora_config)",
    "kasa_config": "KaSA (kasa_config)",
    "target_parameters": "LoRA on raw parameters (target_parameters)",
    "trainable_token_indices": "trainable tokens (trainable_token_indices)",
    "layer_replication": "layer replication (layer_replication)",
}


@dataclass(frozen=True)
class LoraAdapterConfig:
    """The fields of a LoRA `adapter_config.json` that decide the folded weights."""

    r: int
    lora_alpha: float
    use_rslora: bool = False
    fan_in_fan_out: bool = False
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    modules_to_save: list[str] = field(default_factory=list)
    use_dora: bool = False

    def rank_for(self, key: str) -> int:
        """r of module `key`: its rank_pattern entry, else r."""
        return pattern_value(self.rank_pattern, key, self.r)

    def alpha_for(self, key: str) -> float:
        """lora_alpha of module `key`: its alpha_pattern entry, else lora_alpha."""
        return pattern_value(self.alpha_pattern, key, self.lora_alpha)

    def scale_for(self, key: str) -> float:
        """PEFT's `scaling` of module `key` (`lora_scaling`)."""
        return lora_scaling(self.rank_for(key), self.alpha_for(key), self.use_rslora)

    def targets(self, key: str) -> bool:
        """Whether PEFT would put a LoRA layer on module `key`."""
        if self.exclude_modules and module_matches(self.exclude_modules, key):
            return False
        if self.target_modules is None or self.target_modules == "all-linear":
            return True
        return module_matches(self.target_modules, key)


def module_matches(targets: list[str] | str, key: str) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, key) is not None
    return key in targets or any(key.endswith("." + t) for t in targets)


def pattern_key(patterns: dict[str, Any], key: str) -> str | None:
    for pattern in patterns:
        if re.match(rf"(.*\.)?({pattern})$", key):
            return pattern
    return None


def pattern_value(patterns: dict[str, Any], key: str, default: Any) -> Any:
    """The value of the first pattern matching module `key` (`pattern_key`), else `default`."""
    pattern = pattern_key(patterns, key)
    return patterns[pattern] if pattern is not None else default


def lora_scaling(r: int, alpha: float, use_rslora: bool) -> float:
    """PEFT's LoRA `scaling`: alpha / r, or alpha / sqrt(r) with use_rslora (Kalajdzievski 2023)."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def load_lora_config(adapter_dir: Path) -> tuple[LoraAdapterConfig, dict[str, Any]]:
    """(parsed, raw) `adapter_config.json`; CheckpointError for anything not foldable."""
    path, raw = read_config(adapter_dir)
    peft_type = raw.get("peft_type")
    if peft_type != "LORA":
        raise CheckpointError(
            f"{path}: peft_type is {shown(peft_type)}; only LORA adapters can be folded into a base"
        )
    for key, what in _UNSUPPORTED.items():
        if raw.get(key):
            raise CheckpointError(f"{path}: {what} is not supported yet; only plain LoRA folds")

    def need(key: str, kinds: tuple[type, ...], default: Any = None) -> Any:
        """The field's value, `default` when absent or null; CheckpointError on a wrong type."""
        value = raw.get(key)
        if value is None:
            return default
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            raise CheckpointError(f"{path}: '{key}' = {shown(value)} has the wrong type")
        return value

    r = need("r", (int,), 8)
    alpha = need("lora_alpha", (int, float), 8)
    if r < 1:
        raise CheckpointError(f"{path}: r = {r} must be positive")
    # JSON may hold NaN / Infinity: a non-finite alpha would make every folded value NaN.
    check_number(alpha, f"{path}: 'lora_alpha'", error=CheckpointError)
    rank_pattern = need("rank_pattern", (dict,), {})
    alpha_pattern = need("alpha_pattern", (dict,), {})
    for name, pat in (("rank_pattern", rank_pattern), ("alpha_pattern", alpha_pattern)):
        for k, v in pat.items():
            if not is_finite_number(v) or v <= 0:
                raise CheckpointError(
                    f"{path}: {name}[{shown(k)}] = {shown(v)} must be a positive number"
                )
            if name == "rank_pattern" and v != int(v):
                raise CheckpointError(f"{path}: {name}[{shown(k)}] = {shown(v)} must be an integer")
    target = need("target_modules", (list, str))
    exclude = need("exclude_modules", (list, str))
    config = LoraAdapterConfig(
        r=r,
        lora_alpha=alpha,
        use_rslora=bool(raw.get("use_rslora", False)),
        fan_in_fan_out=bool(raw.get("fan_in_fan_out", False)),
        target_modules=target,
        exclude_modules=exclude,
        rank_pattern={k: int(v) for k, v in rank_pattern.items()},
        alpha_pattern=dict(alpha_pattern),
        modules_to_save=list(need("modules_to_save", (list,), [])),
        use_dora=bool(raw.get("use_dora", False)),
    )
    return config, raw
