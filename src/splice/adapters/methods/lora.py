"""LoRA (Hu et al. 2022, "LoRA: Low-Rank Adaptation of Large Language Models").

For a linear layer y = W x + b with W: out×in,

    y = W x + b + s · B A dropout(x),      A: r×in, B: out×r,   ΔW = s · B A
    s = lora_alpha / r                       (use_rslora: lora_alpha / √r, Kalajdzievski 2023)

Choices, as PEFT (peft 0.21) so adapters move between the two unchanged:
- init_lora_weights=True: A ~ kaiming_uniform(a=√5) (nn.Linear's default), B = 0, so the
  adapted model starts equal to the base; "gaussian": A ~ N(0, 1/r²)... as PEFT: std = 1/r;
  False: A and B both random (nn.Linear's default init; for tests).
- rank_pattern / alpha_pattern: the first pattern (in the dict's order) with
  re.match(rf"(.*\\.)?({pattern})$", module path) gives that module's r / lora_alpha.
- GPT-2's Conv1D stores W as in×out: ΔW is (s · B A)ᵀ there (PEFT's fan_in_fan_out, which
  it sets automatically for Conv1D; so does splice).
- The adapter computes in its own dtype (float32 by default): x is cast to A's dtype and
  the update cast back to the output's dtype, as PEFT does.
- Saved keys: ``lora_A.weight``, ``lora_B.weight`` (PEFT's names).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from splice.adapters.config import AdapterConfig
from splice.adapters.layer import AdapterModule
from splice.adapters.registry import adapter_method
from splice.adapters.targeting import is_conv1d, pattern_key

# target_modules when unset, by HF model_type (PEFT's defaults for these architectures).
DEFAULT_TARGETS: dict[str, list[str]] = {
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "gemma3_text": ["q_proj", "v_proj"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "gpt2": ["c_attn"],
}


class LoraConfig(AdapterConfig):
    r: int = Field(8, gt=0)
    lora_alpha: float = Field(8, gt=0)
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    use_rslora: bool = False
    fan_in_fan_out: bool = False
    init_lora_weights: bool | Literal["gaussian"] = True
    rank_pattern: dict[str, int] = Field(default_factory=dict)
    alpha_pattern: dict[str, float] = Field(default_factory=dict)
    bias: Literal["none"] = "none"

    peft_inert_defaults: ClassVar[dict[str, Any]] = {
        "megatron_core": "megatron.core",
        "qalora_group_size": 16,
    }

    def rank_for(self, path: str) -> int:
        key = pattern_key(self.rank_pattern, path)
        return self.rank_pattern[key] if key is not None else self.r

    def alpha_for(self, path: str) -> float:
        key = pattern_key(self.alpha_pattern, path)
        return self.alpha_pattern[key] if key is not None else self.lora_alpha

    def scaling_for(self, path: str) -> float:
        r, alpha = self.rank_for(path), self.alpha_for(path)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


class LoraLinear(AdapterModule):
    """LoRA on nn.Linear or GPT-2 Conv1D."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int,
        scaling: float,
        dropout: float,
        transpose: bool,
        init: bool | str,
    ) -> None:
        super().__init__()
        self.lora_A = nn.Linear(in_features, r, bias=False)
        self.lora_B = nn.Linear(r, out_features, bias=False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling = scaling
        self.transpose = transpose
        self.reset(init)

    @torch.no_grad()
    def reset(self, init: bool | str) -> None:
        if init is False:
            return
        if init == "gaussian":
            nn.init.normal_(self.lora_A.weight, std=1 / self.lora_A.out_features)
        else:
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def transform_output(self, x: Tensor, result: Tensor, base: nn.Module) -> Tensor:
        x = x.to(self.lora_A.weight.dtype)
        update = self.lora_B(self.lora_A(self.dropout(x))) * self.scaling
        return result + update.to(result.dtype)

    def delta(self, base: nn.Module) -> dict[str, Tensor]:
        d = (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling
        return {"weight": d.T if self.transpose else d}

    def factors(self) -> tuple[Tensor, Tensor, float]:
        """(B, A, s) with ΔW = s · B A (before any Conv1D transpose): the low-rank delta."""
        return self.lora_B.weight, self.lora_A.weight, self.scaling


def _features(base: nn.Module) -> tuple[int, int, bool] | None:
    """(in, out, transpose) of a linear-like base layer."""
    if isinstance(base, nn.Linear):
        return base.in_features, base.out_features, False
    if is_conv1d(base):
        in_f, out_f = base.weight.shape
        return in_f, out_f, True
    return None


@adapter_method(LoraConfig, name="lora", peft_type="LORA", default_targets=DEFAULT_TARGETS.get)
def build_lora(base: nn.Module, config: LoraConfig, path: str) -> AdapterModule | None:
    feats = _features(base)
    if feats is None:
        return None
    in_f, out_f, transpose = feats
    module = LoraLinear(
        in_f,
        out_f,
        config.rank_for(path),
        config.scaling_for(path),
        config.lora_dropout,
        transpose or config.fan_in_fan_out,
        config.init_lora_weights,
    )
    return module.to(device=base.weight.device)
