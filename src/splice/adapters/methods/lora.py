"""LoRA (Hu et al. 2022) and its family: rsLoRA, DoRA, PiSSA / OLoRA init, LoRA on
embeddings and Conv2d, bias training. The config and the builder; the modules are in
`lora_layers.py`, the initialisations in `lora_init.py`, LoRA+ in `loraplus.py`.

For a linear layer y = W x + b with W: out×in,

    y = W x + b + s · B A dropout(x),      A: r×in, B: out×r,   ΔW = s · B A
    s = lora_alpha / r                       (use_rslora: lora_alpha / √r, Kalajdzievski 2023)

DoRA (Liu et al. 2024, ``use_dora=True``): W' = m ⊙ (W + s B A) / ‖W + s B A‖_row with a
trainable magnitude m (one per output feature, saved as ``lora_magnitude_vector``, init
‖W‖_row so the model starts unchanged); ΔW = W' − W. Forward and norm detaching as PEFT
(see `lora_layers.py`).

Choices, as PEFT (peft 0.21) so adapters move between the two unchanged:
- layer types: nn.Linear, GPT-2 Conv1D (W stored in×out: ΔW transposed, PEFT's
  fan_in_fan_out, set automatically), nn.Embedding (``lora_embedding_A`` r×num,
  ``lora_embedding_B`` dim×r, ΔW = s (B A)ᵀ), nn.Conv2d (A: conv with the base's kernel,
  stride and padding; B: 1×1 conv; dilation 1 only).
- rank_pattern / alpha_pattern: the first pattern (in the dict's order) with
  re.match(rf"(.*\\.)?({pattern})$", module path) gives that module's r / lora_alpha.
- ``bias``: "none"; "lora_only" trains the targeted layers' biases (saved as PEFT saves them,
  ``<path>.base_layer.bias``); "all" (every bias of the model) is refused for now: it needs
  adapters on non-targeted modules, which the builder cannot reach.
- ``lora_bias``: a bias on lora_B (not with DoRA nor PiSSA/OLoRA, as PEFT).
- Dtypes (PEFT's rule, `splice.adapters.layer`): A, B and m stay float32 on a bf16/fp16
  base; x is cast to A's dtype, the float32 update is added to the base output and the sum
  rounded once to the base output's dtype (not the update first: that rounds twice).
- Initialisations: see `lora_init.py` (default, "gaussian", "pissa", "pissa_niter_K",
  "olora"; the last three rewrite the base weight to W − s·B A).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator
from torch import nn

from splice.adapters.config import AdapterConfig, AdapterConfigError
from splice.adapters.layer import AdapterModule
from splice.adapters.methods.lora_init import initialise, niter_of
from splice.adapters.methods.lora_layers import LoraConv2d, LoraEmbedding, LoraLinear
from splice.adapters.registry import adapter_method
from splice.adapters.targeting import is_linear
from splice.peft.lora_config import lora_scaling, pattern_value

# target_modules when unset, by HF model_type: PEFT 0.21's defaults
# (TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING) for the architectures splice meets;
# a test checks them against PEFT's table.


class LoraConfig(AdapterConfig):
    r: int = Field(8, gt=0)
    lora_alpha: float = Field(8, gt=0)
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    use_rslora: bool = False
    fan_in_fan_out: bool = False
    init_lora_weights: bool | str = True
    rank_pattern: dict[str, int] = Field(default_factory=dict)
    alpha_pattern: dict[str, float] = Field(default_factory=dict)
    bias: Literal["none", "all", "lora_only"] = "none"
    lora_bias: bool = False
    use_dora: bool = False

    peft_inert_defaults: ClassVar[dict[str, Any]] = {
        "megatron_core": "megatron.core",
        "qalora_group_size": 16,
    }

    @model_validator(mode="after")
    def _check(self) -> LoraConfig:
        init = self.init_lora_weights
        if isinstance(init, str) and init not in ("gaussian", "olora"):
            try:
                niter_of(init)
            except AdapterConfigError as e:
                raise ValueError(str(e)) from None
        if self.lora_bias and init not in (True, False):
            raise ValueError(f"lora_bias=True needs init_lora_weights True or False, not {init!r}")
        if self.bias == "all":
            raise ValueError(
                "bias='all' (train every bias of the model) is not supported yet; use "
                "'lora_only' (the targeted layers' biases) or modules_to_save"
            )
        if self.lora_bias and self.use_dora:
            raise ValueError("lora_bias=True is not supported with use_dora=True (as PEFT)")
        return self

    def rank_for(self, path: str) -> int:
        return pattern_value(self.rank_pattern, path, self.r)

    def alpha_for(self, path: str) -> float:
        return pattern_value(self.alpha_pattern, path, self.lora_alpha)

    def scaling_for(self, path: str) -> float:
        return lora_scaling(self.rank_for(path), self.alpha_for(path), self.use_rslora)


def build_lora_module(base: nn.Module, config: LoraConfig, path: str) -> AdapterModule | None:
    """The LoRA / DoRA module for ``base`` (None: an unsupported layer type)."""
    r, s = config.rank_for(path), config.scaling_for(path)
    init = config.init_lora_weights
    train_bias = config.bias != "none"
    rewrites_base = isinstance(init, str) and init != "gaussian"
    module: AdapterModule
    flags = {"lora_bias": config.lora_bias, "use_dora": config.use_dora, "train_bias": train_bias}
    if is_linear(base):
        module = LoraLinear(base, r, s, config.lora_dropout, **flags)
    elif isinstance(base, nn.Embedding):
        if config.lora_bias or rewrites_base:
            what = "lora_bias" if config.lora_bias else f"init_lora_weights={init!r}"
            raise AdapterConfigError(f"{path}: {what} is not supported on an nn.Embedding")
        module = LoraEmbedding(base, r, s, use_dora=config.use_dora)
    elif isinstance(base, nn.Conv2d):
        if base.groups != 1 or base.dilation != (1, 1) or rewrites_base:
            raise AdapterConfigError(
                f"{path}: LoRA on Conv2d supports groups=1, dilation=1 and the default or "
                f"'gaussian' init (groups={base.groups}, dilation={base.dilation}, "
                f"init_lora_weights={init!r})"
            )
        module = LoraConv2d(base, r, s, config.lora_dropout, **flags)
    else:
        return None
    module.to(device=base.weight.device)
    initialise(module, base, init, r)
    if config.use_dora:
        module.init_magnitude(base)
    return module


@adapter_method(LoraConfig, name="lora", peft_type="LORA")
def build_lora(base: nn.Module, config: LoraConfig, path: str) -> AdapterModule | None:
    return build_lora_module(base, config, path)
