"""What LoHa and LoKr (the LyCORIS family, as PEFT 0.21 implements it) share: the config
fields, the per-module rank / alpha, and a layer that adds a dense structured ΔW.

Forward, for a base layer with weight W and the adapter's ΔW (already scaled by
s = alpha / r):

    y = base(x) + op(x, ΔW)        op: F.linear for nn.Linear, the base's own convolution
                                    (stride, padding, dilation, groups) for nn.Conv2d

Training-time only, as PEFT:
- ``module_dropout`` p: each forward skips the whole adapter when a U(0,1) draw is <= p;
- ``rank_dropout`` p: each output row of ΔW is kept when a U(0,1) draw is > p; LoHa always
  rescales the kept rows by 1/mean(mask), LoKr only with ``rank_dropout_scale`` (PEFT's
  choices; a mask of all zeros drops ΔW instead of PEFT's 0/0).
In eval mode neither applies, and ``delta()`` never applies them.
Dtypes as PEFT (`splice.adapters.layer`): ΔW and x·ΔW in the factors' dtype (float32 on a
bf16 base), added to the base output and rounded once.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from splice.adapters.config import AdapterConfig
from splice.adapters.layer import AdapterModule
from splice.delta import Delta, Dense
from splice.peft.lora_config import pattern_value

# PEFT: LoHa / LoKr default targets are LoRA's.


class LycorisConfig(AdapterConfig):
    r: int = Field(8, gt=0)
    alpha: float = Field(8, gt=0)
    rank_dropout: float = Field(0.0, ge=0, lt=1)
    module_dropout: float = Field(0.0, ge=0, le=1)
    use_effective_conv2d: bool = False
    rank_pattern: dict[str, int] = Field(default_factory=dict)
    alpha_pattern: dict[str, float] = Field(default_factory=dict)

    def rank_for(self, path: str) -> int:
        return pattern_value(self.rank_pattern, path, self.r)

    def alpha_for(self, path: str) -> float:
        return pattern_value(self.alpha_pattern, path, self.alpha)


def kaiming_(t: Tensor) -> None:
    """nn.Linear's default init (kaiming_uniform, a=√5), used by PEFT for these factors."""
    nn.init.kaiming_uniform_(t, a=math.sqrt(5))


def cp_factor(t: Tensor, wa: Tensor, wb: Tensor) -> Tensor:
    """Tucker/CP form of a conv factor: R[p, q, a, b] = Σ_{u,v} T[u, v, a, b] · Wa[u, p] ·
    Wb[v, q]  (T: r×r×k1×k2, Wa: r×out, Wb: r×in -> out×in×k1×k2)."""
    return torch.einsum("uvab,up,vq->pqab", t, wa, wb)


def conv_shape(base: nn.Module) -> tuple[int, int, tuple[int, ...]] | None:
    """(out, in per group, kernel) of a supported base layer; kernel () for nn.Linear."""
    if isinstance(base, nn.Linear):
        return base.out_features, base.in_features, ()
    if isinstance(base, nn.Conv2d):
        return base.out_channels, base.in_channels // base.groups, tuple(base.kernel_size)
    return None


class LycorisModule(AdapterModule):
    """A dense ΔW added to a Linear / Conv2d output; subclasses build ``raw_delta``."""

    def __init__(self, config: LycorisConfig, path: str, rescale_rank_dropout: bool) -> None:
        super().__init__()
        self.r = config.rank_for(path)
        self.scaling = config.alpha_for(path) / self.r
        self.rank_dropout = config.rank_dropout
        self.module_dropout = config.module_dropout
        self.rescale_rank_dropout = rescale_rank_dropout

    def raw_delta(self) -> Tensor:
        """ΔW = s · (structured product), any shape with the base weight's element count."""
        raise NotImplementedError

    def _weight(self, base: nn.Module) -> Tensor:
        return self.raw_delta().reshape(base.weight.shape)

    def transform_output(self, x: Tensor, result: Tensor, base: nn.Module) -> Tensor:
        if self.training and self.module_dropout and torch.rand(1).item() <= self.module_dropout:
            return result
        w = self._weight(base)
        if self.training and self.rank_dropout:
            keep = (torch.rand(w.shape[0]) > self.rank_dropout).to(w.dtype).to(w.device)
            if self.rescale_rank_dropout and keep.sum() > 0:
                keep = keep / keep.mean()
            w = w * keep.view(-1, *[1] * (w.dim() - 1))
        x = x.to(w.dtype)
        # Conv2d: the base's own convolution (stride, padding, dilation, groups, padding_mode)
        update = F.linear(x, w) if isinstance(base, nn.Linear) else base._conv_forward(x, w, None)
        return result + update

    def delta(self, base: nn.Module) -> dict[str, Delta]:
        return {"weight": Dense(self._weight(base).float())}

    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling}"


def build_lycoris(
    module_type: type[LycorisModule], base: nn.Module, config: LycorisConfig, path: str
) -> LycorisModule | None:
    """``module_type(config, path, out, in, kernel)`` for a supported base layer (None for
    another layer type), on the base's device."""
    shape = conv_shape(base)
    if shape is None:
        return None
    return module_type(config, path, *shape).to(device=base.weight.device)
