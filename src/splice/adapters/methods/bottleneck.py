"""Bottleneck adapters (Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP";
Pfeiffer et al. 2021, "AdapterFusion"), placements as in AdapterHub's ``adapters`` library.

An activation-space module on the output h (hidden size d) of a named module:

    h ← h + s · dropout(W_up · f(W_down · h + b_down) + b_up)
    W_down: m×d, W_up: d×m,  m = bottleneck_size, or d // reduction_factor (default 16; ≥ 1)

f = ``non_linearity`` (relu, gelu (exact erf form), swish = silu, tanh), s = ``scaling``.
It has no weight delta: folding it is an error (`deltas()` too).

Init (``init_weights``, AdapterHub's names): "mam_adapter" (default): W_down kaiming-uniform,
W_up = 0, biases 0 — the adapted model starts exactly at the base; "bert": all weights
N(0, 0.02²), biases 0 (AdapterHub's default: near identity); "houlsby": truncated
N(0, 0.01²) in ±0.02, biases 0.

Placement (``placement``; ``target_modules`` overrides it): the modules whose output is
adapted, by architecture —

    placement  BERT/RoBERTa                         Llama-family       GPT-2
    houlsby    attention.output.dense, output.dense  self_attn.o_proj,  attn.c_proj,
                                                     mlp.down_proj      mlp.c_proj
    pfeiffer   output.dense (the FFN's)              mlp.down_proj      mlp.c_proj

(as a regex over all of these, so one config serves each family). splice applies the adapter
to the named module's output h, so h ← h + f(h) happens before the block's residual add (and,
in BERT, before the sub-layer's dropout and LayerNorm). Relation to AdapterHub (read from
``adapters``' Adapter.pre_forward / post_forward and its model mixins):
- Houlsby (``double_seq_bn``: original_ln_before=False, residual_before_ln=True): AdapterHub
  computes h + f(h) on the sub-layer output and then the block's own residual (and, BERT,
  LayerNorm(· + input)). Llama: identical (the sub-layer output *is* o_proj's / down_proj's
  output). BERT / GPT-2: AdapterHub's h is dropout(dense(·)) (GPT-2: resid_dropout(c_proj(·))),
  splice's is the projection's output: identical in eval mode; in training the dropout falls
  on h + f(h) instead of on h.
- Pfeiffer (``seq_bn``: original_ln_before=True): AdapterHub feeds the adapter the residual
  stream *after* the add (Llama: f(h + x); BERT: f(LN(h + x)) with the LayerNorm applied again
  after). splice's "pfeiffer" is that *placement* (one adapter per block, after the FFN)
  with the Houlsby form h + f(h): not numerically AdapterHub's seq_bn, so weights do not
  transfer between the two (splice does not read AdapterHub folders in any case).
The Houlsby equality is tested against AdapterHub's outputs on a tiny Llama and BERT
(tests/compose/test_adapterhub_parity.py, docs/composition.md "Parity with AdapterHub").

Splice-only (PEFT has no bottleneck adapter): saved as ``SPLICE_BOTTLENECK`` in the same
folder layout, keys ``<module path>.adapter_down.weight|bias``, ``adapter_up.weight|bias``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from splice.adapters.config import AdapterConfig, AdapterConfigError
from splice.adapters.layer import AdapterModule
from splice.adapters.registry import adapter_method
from splice.adapters.targeting import linear_features

# Module-name regexes (matched against the path's tail) for each placement, by family.
_SITES: dict[str, dict[str, list[str]]] = {
    "bert": {"attention": [r"attention\.output\.dense"], "ffn": [r"layer\.\d+\.output\.dense"]},
    "llama": {"attention": [r"self_attn\.o_proj"], "ffn": [r"mlp\.down_proj"]},
    "gpt2": {"attention": [r"attn\.c_proj"], "ffn": [r"mlp\.c_proj"]},
}
PLACEMENT_SITES = {"houlsby": ("attention", "ffn"), "pfeiffer": ("ffn",)}

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "swish": F.silu,
    "silu": F.silu,
    "tanh": torch.tanh,
}


def placement_regex(placement: str) -> str:
    """One full-match regex over the module names of ``placement`` for every known family."""
    alts = [
        pattern
        for family in _SITES.values()
        for site in PLACEMENT_SITES[placement]
        for pattern in family[site]
    ]
    return r"(.*\.)?(" + "|".join(alts) + ")"


class BottleneckConfig(AdapterConfig):
    placement: Literal["houlsby", "pfeiffer"] = "pfeiffer"
    reduction_factor: float | None = Field(None, gt=0)
    bottleneck_size: int | None = Field(None, gt=0)
    non_linearity: Literal["relu", "gelu", "swish", "silu", "tanh"] = "relu"
    scaling: float = 1.0
    dropout: float = Field(0.0, ge=0, lt=1)
    init_weights: Literal["mam_adapter", "bert", "houlsby"] = "mam_adapter"

    @model_validator(mode="before")
    @classmethod
    def _placement_targets(cls, data: Any) -> Any:
        """Unset target_modules: the placement's sites (an invalid placement is left for the
        field check to report)."""
        if isinstance(data, dict) and data.get("target_modules") is None:
            placement = data.get("placement", "pfeiffer")
            if placement in PLACEMENT_SITES:
                data = {**data, "target_modules": placement_regex(placement)}
        return data

    @model_validator(mode="after")
    def _one_size(self) -> BottleneckConfig:
        if self.reduction_factor is not None and self.bottleneck_size is not None:
            raise AdapterConfigError(
                "bottleneck: set reduction_factor or bottleneck_size, not both"
            )
        return self

    def size_for(self, hidden: int) -> int:
        if self.bottleneck_size is not None:
            return self.bottleneck_size
        return max(1, int(hidden // (self.reduction_factor or 16)))


class BottleneckAdapter(AdapterModule):
    """h ← h + s · dropout(up(f(down(h)))) on the wrapped module's output."""

    foldable = False

    def __init__(self, hidden: int, config: BottleneckConfig) -> None:
        super().__init__()
        m = config.size_for(hidden)
        self.adapter_down = nn.Linear(hidden, m)
        self.adapter_up = nn.Linear(m, hidden)
        self.act = ACTIVATIONS[config.non_linearity]
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.scaling = config.scaling
        self.reset(config.init_weights)

    @torch.no_grad()
    def reset(self, init: str) -> None:
        down, up = self.adapter_down, self.adapter_up
        if init == "mam_adapter":
            nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5))
            nn.init.zeros_(up.weight)
        elif init == "bert":
            nn.init.normal_(down.weight, std=0.02)
            nn.init.normal_(up.weight, std=0.02)
        else:  # houlsby
            nn.init.trunc_normal_(down.weight, std=1e-2, a=-2e-2, b=2e-2)
            nn.init.trunc_normal_(up.weight, std=1e-2, a=-2e-2, b=2e-2)
        nn.init.zeros_(down.bias)
        nn.init.zeros_(up.bias)

    def transform_output(self, x: Tensor, result: Tensor, base: nn.Module) -> Tensor:
        h = result.to(self.adapter_down.weight.dtype)
        update = self.dropout(self.adapter_up(self.act(self.adapter_down(h)))) * self.scaling
        return result + update


@adapter_method(BottleneckConfig, name="bottleneck", folds=False)
def build_bottleneck(base: nn.Module, config: BottleneckConfig, path: str) -> AdapterModule | None:
    features = linear_features(base)
    if features is None:
        return None
    hidden = features[1]  # the output size
    if config.bottleneck_size is not None and config.bottleneck_size > hidden:
        raise AdapterConfigError(
            f"bottleneck: '{path}': bottleneck_size {config.bottleneck_size} exceeds the "
            f"hidden size {hidden}"
        )
    return BottleneckAdapter(hidden, config).to(device=base.weight.device)
