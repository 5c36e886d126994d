"""LayerNorm tuning (Zhao et al. 2024, "Tuning LayerNorm in Attention: Towards Efficient
Multi-Modal LLM Finetuning"), PEFT's ``LN_TUNING``.

Each targeted module (a LayerNorm / RMSNorm: γ, and β where it has one) gets a trainable copy
that replaces the base module in the forward:

    y = norm_copy(x),        Δγ = γ_copy − γ,   Δβ = β_copy − β      (delta given the base)

Init: the copy equals the base, so the model starts unchanged. Folding adds the deltas to
the base parameters (the base then holds the copy's values, to float rounding); unfold
restores the originals exactly.

Targets, as PEFT: modules are chosen by *name* (``target_modules``, or PEFT's per-model
default list, e.g. llama: input_layernorm, post_attention_layernorm, norm); like PEFT, any
module with parameters may be targeted (the copy replaces it whatever it is). PEFT has no
default for BERT / RoBERTa; splice adds ``["LayerNorm"]`` there (every ``*.LayerNorm``).
Several LN-tuning adapters active on one layer: the last one's copy runs (PEFT refuses).

Saved keys, as PEFT: ``<module path>.ln_tuning_layers.<param>`` (weight, bias).
"""

from __future__ import annotations

from torch import Tensor, nn

from splice.adapters.config import AdapterConfig
from splice.adapters.full_copy import FullCopy
from splice.adapters.layer import AdapterModule
from splice.adapters.registry import adapter_method

PREFIX = "ln_tuning_layers."


class LNTuningConfig(AdapterConfig):
    """Only the targeting fields (PEFT's LNTuningConfig has no other option)."""


class LNTuningCopy(FullCopy):
    """A trainable copy of one norm layer that replaces it in the forward."""

    def peft_state(self) -> dict[str, Tensor]:
        return {PREFIX + k: v for k, v in self.module.state_dict().items()}

    def load_peft_state(self, state: dict[str, Tensor], where: str) -> None:
        AdapterModule.load_peft_state(
            self, {"module." + k.removeprefix(PREFIX): v for k, v in state.items()}, where
        )


@adapter_method(LNTuningConfig, name="ln_tuning", peft_type="LN_TUNING")
def build_ln_tuning(base: nn.Module, config: LNTuningConfig, path: str) -> AdapterModule | None:
    if not any(True for _ in base.parameters()):
        return None
    return LNTuningCopy(base)
