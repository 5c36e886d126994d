"""LoKr (LyCORIS; Edalati et al. 2022, "KronA: Parameter Efficient Tuning with Kronecker
Adapter"): ΔW as a Kronecker product of a small and a (possibly low-rank) larger factor.

Linear (W: out×in), out = a·b and in = c·d by `factorization`, s = alpha / r:

    ΔW = s · W1 ⊗ W2,     W1: a×c (or W1a W1b, a×r · r×c),  W2: b×d (or W2a W2b, b×r · r×d)

    (W1 ⊗ W2)[i·b + j, m·d + n] = W1[i, m] · W2[j, n]

Conv2d (W: out×in/groups×k1×k2): W2 is b×d×k1×k2 (full), or W2a W2b with W2b: r×(d·k1·k2),
or with ``use_effective_conv2d`` the CP form Σ T2[u,v,·,·] W2a[u,p] W2b[v,q]; W1 is
broadcast over the kernel, ΔW = s · W1 ⊗ W2 reshaped to W's shape.

Choices, as PEFT (peft 0.21) so adapters move between the two unchanged:
- `factorization(dim, factor)`: factor > 0 dividing dim gives (factor, dim / factor);
  otherwise the divisor pair closest to √dim with the smaller one <= factor (-1: no bound),
  smaller first. out = (a, b), in = (c, d).
- W1 is full unless ``decompose_both`` and r < max(a, c) / 2; W2 is full unless
  r < max(b, d) / 2 (then low-rank, or CP for an effective conv).
- Init (``init_weights=True``): W1 (or W1a) = 0, the others kaiming_uniform(a=√5), so ΔW = 0;
  "lycoris": W2 (or W2b) = 0, the others random; False: all random.
- rank_dropout / module_dropout: training only (see `_lycoris`); kept rows are rescaled by
  1/mean only with ``rank_dropout_scale``.
- Saved keys ``lokr_w1`` | ``lokr_w1_a``/``lokr_w1_b``, ``lokr_w2`` | ``lokr_w2_a``/
  ``lokr_w2_b`` (+ ``lokr_t2``).
- Layers: nn.Linear and nn.Conv2d (PEFT's Conv1d path and GPT-2's Conv1D are not supported).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import field_validator
from torch import Tensor, nn

from splice.adapters.layer import AdapterModule
from splice.adapters.methods._lycoris import (
    LycorisConfig,
    LycorisModule,
    build_lycoris,
    cp_factor,
    kaiming_,
)
from splice.adapters.registry import adapter_method


class LoKrConfig(LycorisConfig):
    decompose_both: bool = False
    decompose_factor: int = -1
    rank_dropout_scale: bool = False
    init_weights: bool | Literal["lycoris"] = True

    @field_validator("decompose_factor")
    @classmethod
    def _factor(cls, v: int) -> int:
        if v != -1 and v <= 0:
            raise ValueError("decompose_factor must be -1 (near √dim) or a positive integer")
        return v


def factorization(dim: int, factor: int = -1) -> tuple[int, int]:
    """Split ``dim`` = m·n (PEFT / LyCORIS rule, see the module docstring)."""
    if factor > 0 and dim % factor == 0:
        return factor, dim // factor
    limit = dim if factor == -1 else factor
    m, n = 1, dim
    while m < n:
        d = m + 1
        while dim % d:
            d += 1
        if d > limit:
            break
        m, n = d, dim // d
    return min(m, n), max(m, n)


def kron_delta(w1: Tensor, w2: Tensor, scale: float) -> Tensor:
    """s · W1 ⊗ W2; a 4-d W2 (conv) takes W1 broadcast over the kernel axes."""
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]
    return torch.kron(w1, w2.contiguous()) * scale


class LoKr(LycorisModule):
    def __init__(
        self, config: LoKrConfig, path: str, out_f: int, in_f: int, kernel: tuple[int, ...]
    ) -> None:
        super().__init__(config, path, rescale_rank_dropout=config.rank_dropout_scale)
        r, f = self.r, config.decompose_factor
        a, b = factorization(out_f, f)
        c, d = factorization(in_f, f)
        self.use_w1 = not (config.decompose_both and r < max(a, c) / 2)
        self.use_w2 = not (r < max(b, d) / 2)
        self.effective = config.use_effective_conv2d and len(kernel) > 0 and kernel != (1, 1)
        if self.use_w1:
            self.lokr_w1 = nn.Parameter(torch.empty(a, c))
        else:
            self.lokr_w1_a = nn.Parameter(torch.empty(a, r))
            self.lokr_w1_b = nn.Parameter(torch.empty(r, c))
        if self.use_w2:
            self.lokr_w2 = nn.Parameter(torch.empty(b, d, *kernel))
        elif self.effective:
            self.lokr_t2 = nn.Parameter(torch.empty(r, r, *kernel))
            self.lokr_w2_a = nn.Parameter(torch.empty(r, b))
            self.lokr_w2_b = nn.Parameter(torch.empty(r, d))
        else:
            self.lokr_w2_a = nn.Parameter(torch.empty(b, r))
            self.lokr_w2_b = nn.Parameter(torch.empty(r, d * math.prod(kernel)))
        self.reset(config.init_weights)

    @torch.no_grad()
    def reset(self, init: bool | str) -> None:
        for p in self.parameters():
            kaiming_(p)
        if init is True:  # the W1 side starts at zero
            nn.init.zeros_(self.lokr_w1 if self.use_w1 else self.lokr_w1_a)
        elif init == "lycoris":  # the W2 side starts at zero
            nn.init.zeros_(self.lokr_w2 if self.use_w2 else self.lokr_w2_b)

    def factors(self) -> tuple[Tensor, Tensor]:
        """(W1, W2) with ΔW = s · W1 ⊗ W2 (before reshaping to the base weight)."""
        w1 = self.lokr_w1 if self.use_w1 else self.lokr_w1_a @ self.lokr_w1_b
        if self.use_w2:
            w2 = self.lokr_w2
        elif self.effective:
            w2 = cp_factor(self.lokr_t2, self.lokr_w2_a, self.lokr_w2_b)
        else:
            w2 = self.lokr_w2_a @ self.lokr_w2_b
        return w1, w2

    def raw_delta(self) -> Tensor:
        w1, w2 = self.factors()
        return kron_delta(w1, w2, self.scaling)


@adapter_method(LoKrConfig, name="lokr", peft_type="LOKR")
def build_lokr(base: nn.Module, config: LoKrConfig, path: str) -> AdapterModule | None:
    return build_lycoris(LoKr, base, config, path)
