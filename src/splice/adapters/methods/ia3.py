"""(IA)³ (Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper
than In-Context Learning"): a learned vector l rescales activations.

For a linear layer y = W x + b (W: out×in):

    attention-like target:     y' = l ⊙ (W x + b),   l ∈ R^out
    feed-forward target:       y' = W (l ⊙ x) + b,   l ∈ R^in

so the adapted weight is W·diag-scaled and the delta on named parameters is

    output scaling:  ΔW = W ⊙ (l − 1) on the rows (l as a column),   Δb = b ⊙ (l − 1)
    input scaling:   ΔW = W ⊙ (l − 1) on the columns (l as a row),   Δb = 0

Choices, as PEFT (peft 0.21) so adapters move between the two unchanged:
- ``feedforward_modules`` picks the input-scaled targets: a string is a full-match regex on
  the module path, a list matches a path that *ends with* an entry (PEFT's rule: plain
  ``str.endswith``, no dot boundary). Unset, it takes PEFT's per-architecture default (e.g.
  llama: ``down_proj``); for an unknown architecture it must be given (``[]`` for none).
  It must be a subset of ``target_modules`` when both are lists (PEFT checks the same).
- Init: l = 1 (the adapted model equals the base); ``init_ia3_weights=False``: l ~ N(0, 1).
- Saved as ``ia3_l`` with PEFT's shapes: (out, 1) for output scaling, (1, in) for input
  scaling; Conv2d/Conv3d: (1, C, 1, 1[, 1]).
- GPT-2 ``Conv1D`` stores W as in×out: l is applied on the transposed axis (PEFT's
  ``fan_in_fan_out``, which PEFT, and splice, set from the layer type).
- Several active (IA)³ adapters on one layer multiply (PEFT's product of the vectors).
- The delta depends on the base weights it scales: ``deltas()`` uses the current base (with
  any adapter folded before it).
- Dtypes as PEFT: l stays float32 on a bf16 base; x ⊙ l (rounded to x's dtype before the
  base layer) or (W x + b) ⊙ l are computed in float32 and rounded once.
- Conv layers: input scaling is supported only for ``groups == 1`` (PEFT broadcasts a
  grouped layout; not needed for the models splice targets).
"""

from __future__ import annotations

import re
from typing import Any, ClassVar

import torch
from pydantic import model_validator
from torch import Tensor, nn

from splice.adapters.config import AdapterConfig, AdapterConfigError
from splice.adapters.default_targets import IA3_FEEDFORWARD
from splice.adapters.layer import AdapterModule
from splice.adapters.registry import adapter_method
from splice.adapters.targeting import linear_features
from splice.delta import Delta, Folded

# PEFT's per-architecture defaults (TRANSFORMERS_MODELS_TO_IA3_*_MAPPING), main families.


class IA3Config(AdapterConfig):
    feedforward_modules: list[str] | str | None = None
    fan_in_fan_out: bool = False
    init_ia3_weights: bool = True

    peft_inert_defaults: ClassVar[dict[str, Any]] = {}

    @model_validator(mode="after")
    def _feedforward_subset(self) -> IA3Config:
        ff, tm = self.feedforward_modules, self.target_modules
        if isinstance(ff, str):
            try:
                re.compile(ff)
            except re.error as e:
                raise ValueError(f"feedforward_modules is not a valid regex ({e})") from None
        if isinstance(ff, list) and isinstance(tm, list) and not set(ff) <= set(tm):
            extra = sorted(set(ff) - set(tm))
            raise ValueError(f"feedforward_modules {extra} are not in target_modules {tm}")
        return self

    def is_feedforward(self, path: str) -> bool:
        ff = self.feedforward_modules
        if ff is None:
            return False
        if isinstance(ff, str):
            return re.fullmatch(ff, path) is not None
        return any(path.endswith(k) for k in ff)

    def for_targets(self, model: Any, targets: list[tuple[str, Any]]) -> IA3Config:
        if self.feedforward_modules is not None:
            return self
        model_type = getattr(getattr(model, "config", None), "model_type", "")
        if model_type not in IA3_FEEDFORWARD:
            raise AdapterConfigError(
                f"ia3: set feedforward_modules (no default for model type {model_type!r}); "
                "use [] when no target is a feed-forward layer"
            )
        return self.model_copy(update={"feedforward_modules": IA3_FEEDFORWARD[model_type]})


class IA3(AdapterModule):
    """(IA)³ on nn.Linear, GPT-2 Conv1D, nn.Conv2d or nn.Conv3d."""

    def __init__(self, shape: tuple[int, ...], feedforward: bool, kind: str, init: bool) -> None:
        super().__init__()
        self.ia3_l = nn.Parameter(torch.ones(shape) if init else torch.randn(shape))
        self.feedforward = feedforward
        self.kind = kind  # "linear", "conv1d" (GPT-2, W stored in×out) or "conv"

    def _act_scale(self) -> Tensor:
        # linear: a flat vector on the last axis; conv: (1, C, 1, ...) on the channel axis
        return self.ia3_l if self.kind == "conv" else self.ia3_l.flatten()

    def changes_base_input(self) -> bool:
        return self.feedforward

    def transform_input(self, x: Tensor, base: nn.Module) -> Tensor:
        if not self.feedforward:
            return x
        return x.to(self.ia3_l.dtype) * self._act_scale()

    def transform_output(self, x: Tensor, result: Tensor, base: nn.Module) -> Tensor:
        if self.feedforward:
            return result
        return result * self._act_scale()

    def weight_scale(self) -> Tensor:
        """l shaped to broadcast against the base weight."""
        vec = self.ia3_l.float()
        if self.kind == "conv1d":
            return vec.T  # W is in×out: (out,1) -> (1,out), (1,in) -> (in,1)
        if self.kind == "conv" and not self.feedforward:
            return vec.transpose(0, 1)  # (1, C_out, 1, 1) -> (C_out, 1, 1, 1)
        return vec

    def delta(self, base: nn.Module) -> dict[str, Delta]:
        """ΔW = W ⊙ (l − 1) (and b ⊙ (l − 1) for an output scaling): `Folded` "scale"."""
        size = tuple(base.weight.shape)
        out: dict[str, Delta] = {"weight": Folded("scale", {"vector": self.weight_scale()}, size)}
        bias = getattr(base, "bias", None)
        if not self.feedforward and bias is not None:
            vector = self.ia3_l.float().flatten()
            out["bias"] = Folded("scale", {"vector": vector}, tuple(bias.shape))
        return out


@adapter_method(IA3Config, name="ia3", peft_type="IA3")
def build_ia3(base: nn.Module, config: IA3Config, path: str) -> AdapterModule | None:
    ff = config.is_feedforward(path)
    features = linear_features(base)
    if features is not None:
        n_in, n_out, conv1d = features
        kind = "conv1d" if conv1d else "linear"
    elif isinstance(base, (nn.Conv2d, nn.Conv3d)):
        kind, n_in, n_out = "conv", base.in_channels, base.out_channels
        if ff and base.groups != 1:
            raise AdapterConfigError(
                f"ia3: {path} is a grouped convolution (groups={base.groups}); input scaling "
                "(feedforward_modules) supports groups=1 only"
            )
    else:
        return None
    if kind == "conv":
        shape = (1, n_in if ff else n_out) + (1,) * (base.weight.dim() - 2)
    else:
        shape = (1, n_in) if ff else (n_out, 1)
    module = IA3(shape, ff, kind, config.init_ia3_weights)
    return module.to(device=base.weight.device)
