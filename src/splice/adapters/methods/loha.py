"""LoHa (Hyeon-Woo et al. 2022, "FedPara: Low-Rank Hadamard Product for
Communication-Efficient Federated Learning"; LyCORIS): a Hadamard product of two low-rank
matrices, rank up to r² for 4·r·(in+out)/2 parameters.

Linear (W: out×in), s = alpha / r:

    ΔW = s · (W1a W1b) ⊙ (W2a W2b)         W1a, W2a: out×r;  W1b, W2b: r×in

Conv2d (W: out×in×k1×k2): as Linear on W viewed as out×(in·k1·k2); with
``use_effective_conv2d`` (kernel not 1×1) each factor is a Tucker/CP form
R_i[p, q, a, b] = Σ_{u,v} T_i[u, v, a, b] Wia[u, p] Wib[v, q] (T_i: r×r×k1×k2,
Wia: r×out, Wib: r×in), and ΔW = s · R_1 ⊙ R_2.

Choices, as PEFT (peft 0.21) so adapters move between the two unchanged:
- Init (FedPara's He init, PEFT's): W1a, W1b, W2a ~ kaiming_uniform(a=√5), W2b = 0 (so ΔW
  = 0 at start); T1, T2 kaiming_uniform; ``init_weights=False``: W2b random too.
- Saved keys ``hada_w1_a``, ``hada_w1_b``, ``hada_w2_a``, ``hada_w2_b`` (+ ``hada_t1``,
  ``hada_t2``).
- rank_dropout / module_dropout: training only (see `_lycoris`); LoHa rescales the kept rows
  by 1/mean, as PEFT (and LyCORIS) do.
- Layers: nn.Linear and nn.Conv2d (PEFT also has Conv1d; GPT-2's Conv1D is not supported by
  PEFT's LoHa either).
"""

from __future__ import annotations

import math

import torch
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


class LoHaConfig(LycorisConfig):
    init_weights: bool = True


def hadamard_delta(w1a: Tensor, w1b: Tensor, w2a: Tensor, w2b: Tensor, scale: float) -> Tensor:
    """s · (W1a W1b) ⊙ (W2a W2b)."""
    return (w1a @ w1b) * (w2a @ w2b) * scale


class LoHa(LycorisModule):
    def __init__(
        self, config: LoHaConfig, path: str, out_f: int, in_f: int, kernel: tuple[int, ...]
    ) -> None:
        super().__init__(config, path, rescale_rank_dropout=True)
        r = self.r
        self.effective = config.use_effective_conv2d and len(kernel) > 0 and kernel != (1, 1)
        if self.effective:
            self.hada_w1_a = nn.Parameter(torch.empty(r, out_f))
            self.hada_w1_b = nn.Parameter(torch.empty(r, in_f))
            self.hada_w2_a = nn.Parameter(torch.empty(r, out_f))
            self.hada_w2_b = nn.Parameter(torch.empty(r, in_f))
            self.hada_t1 = nn.Parameter(torch.empty(r, r, *kernel))
            self.hada_t2 = nn.Parameter(torch.empty(r, r, *kernel))
        else:
            cols = in_f * math.prod(kernel)
            self.hada_w1_a = nn.Parameter(torch.empty(out_f, r))
            self.hada_w1_b = nn.Parameter(torch.empty(r, cols))
            self.hada_w2_a = nn.Parameter(torch.empty(out_f, r))
            self.hada_w2_b = nn.Parameter(torch.empty(r, cols))
        self.reset(config.init_weights)

    @torch.no_grad()
    def reset(self, init: bool) -> None:
        for p in (self.hada_w1_a, self.hada_w1_b, self.hada_w2_a, self.hada_w2_b):
            kaiming_(p)
        if init:
            nn.init.zeros_(self.hada_w2_b)
        if self.effective:
            kaiming_(self.hada_t1)
            kaiming_(self.hada_t2)

    def raw_delta(self) -> Tensor:
        if self.effective:
            r1 = cp_factor(self.hada_t1, self.hada_w1_a, self.hada_w1_b)
            r2 = cp_factor(self.hada_t2, self.hada_w2_a, self.hada_w2_b)
            return r1 * r2 * self.scaling
        return hadamard_delta(
            self.hada_w1_a, self.hada_w1_b, self.hada_w2_a, self.hada_w2_b, self.scaling
        )


@adapter_method(LoHaConfig, name="loha", peft_type="LOHA")
def build_loha(base: nn.Module, config: LoHaConfig, path: str) -> AdapterModule | None:
    return build_lycoris(LoHa, base, config, path)
