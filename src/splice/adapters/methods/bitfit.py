"""BitFit (Ben Zaken et al. 2022, "BitFit: Simple Parameter-efficient Fine-tuning for
Transformer-based Masked Language-models"): only the biases train.

As a splice adapter: each targeted module with a bias b gets a trainable Δb (init 0) and

    out = base(x) + Δb          (Δb added along the bias's axis: last for Linear / Conv1D /
                                 LayerNorm, the channel axis 1 for Conv / BatchNorm / GroupNorm)
    delta = {"bias": Δb}        (so folding gives b + Δb: exact, foldable)

This equals training b itself, since every supported layer adds its bias last.

Targets: ``target_modules``, or by model type the modules that carry a bias (bert/roberta:
query, key, value, every dense, every LayerNorm; gpt2: c_attn, c_proj, c_fc, ln_1, ln_2,
ln_f; qwen2: q/k/v_proj; llama-family: every linear layer, which have no bias there — so
BitFit needs ``add_missing_bias=True`` on them). Matched modules without a bias:
- ``add_missing_bias=False`` (default): skipped (wrapped with an inert pass-through that has
  no parameters and no delta); if *no* matched module has a bias it is an error;
- ``add_missing_bias=True``: an nn.Linear without a bias gets one — a frozen zero ``bias``
  parameter added to the *base* layer at injection (numerically a no-op: W x + 0), so Δb has
  a base parameter to fold into: folding writes Δb there, unfold restores the zeros
  exactly, merge_and_unload returns a Linear with a bias, and `deltas()` names
  ``<path>.bias``. The zero bias stays in the model after `delete_adapter`. Other bias-less
  modules (RMSNorm, LayerNorm(bias=False)) are still skipped.

Splice-only (PEFT has no BitFit adapter type): saved as ``SPLICE_BITFIT``, key
``<module path>.bitfit_bias``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from splice.adapters.config import AdapterConfig, AdapterConfigError
from splice.adapters.layer import AdapterModule
from splice.adapters.registry import adapter_method
from splice.adapters.targeting import is_conv1d
from splice.delta import Delta, Dense

# modules whose bias is added on the channel axis (1) rather than the last one
_CHANNEL_FIRST = (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm, nn.GroupNorm)
_LAST_AXIS = (nn.Linear, nn.LayerNorm)


def _bias(module: nn.Module) -> Tensor | None:
    b = getattr(module, "bias", None)
    return b if isinstance(b, Tensor) else None


def _gains_bias(module: nn.Module, add_missing: bool) -> bool:
    return add_missing and isinstance(module, nn.Linear) and _bias(module) is None


class BitFitConfig(AdapterConfig):
    add_missing_bias: bool = False

    def for_targets(self, model: Any, targets: list[tuple[str, Any]]) -> BitFitConfig:
        """Refuse a target set in which nothing would train."""
        if not any(
            _bias(m) is not None or _gains_bias(m, self.add_missing_bias) for _, m in targets
        ):
            raise AdapterConfigError(
                f"bitfit: none of the {len(targets)} targeted modules has a bias (e.g. "
                f"'{targets[0][0]}'); set add_missing_bias=True to give nn.Linear layers one"
            )
        return self


class BitFitBias(AdapterModule):
    """out = base(x) + Δb."""

    def __init__(self, bias: Tensor, channel_axis: int) -> None:
        super().__init__()
        self.bitfit_bias = nn.Parameter(torch.zeros(bias.shape, device=bias.device))
        self.channel_axis = channel_axis

    def transform_output(self, x: Tensor, result: Tensor, base: nn.Module) -> Tensor:
        d = self.bitfit_bias
        if self.channel_axis == 1 and result.dim() > 2:
            d = d.reshape(-1, *([1] * (result.dim() - 2)))
        return result + d

    def delta(self, base: nn.Module) -> dict[str, Delta]:
        return {"bias": Dense(self.bitfit_bias.float())}


class BitFitSkip(AdapterModule):
    """A matched module without a bias: passes through; no parameters, no delta."""

    def delta(self, base: nn.Module) -> dict[str, Delta]:
        return {}


@adapter_method(BitFitConfig, name="bitfit")
def build_bitfit(base: nn.Module, config: BitFitConfig, path: str) -> AdapterModule | None:
    if _gains_bias(base, config.add_missing_bias):
        assert isinstance(base, nn.Linear)
        w = base.weight
        base.bias = nn.Parameter(
            torch.zeros(base.out_features, dtype=w.dtype, device=w.device), requires_grad=False
        )
    bias = _bias(base)
    if bias is None:
        return BitFitSkip()
    if isinstance(base, _LAST_AXIS) or is_conv1d(base):
        return BitFitBias(bias, -1)
    if isinstance(base, _CHANNEL_FIRST):
        return BitFitBias(bias, 1)
    return None  # a bias of unknown placement: the caller reports the module type
