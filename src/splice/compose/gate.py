"""Gates of a routed mixture: logits → top-k renormalized softmax weights over the experts.

For logits z ∈ R^N (N experts) at one routing position (a token or a sequence):

    p = softmax(z)
    dense (top_k None):  g = p
    top-k:               g_i = p_i / Σ_{j∈K} p_j for i ∈ K (the k largest p), else 0
    top-k, renormalize=False:  g_i = p_i for i ∈ K, else 0

The renormalized form is MixLoRA's router (TUDB-Labs/MixLoRA ``MixLoraSparseMoe.forward``:
softmax, ``topk``, divide by the sum of the kept weights), the same as Mixtral's. X-LoRA
(Buehler & Buehler 2024, ``xLoRALayer.get_maybe_topk_scalings``) keeps the top-k softmax
values *without* renormalizing them (or re-softmaxes them with ``enable_softmax_topk``), as
Switch Transformer does for top-1: ``renormalize=False``. Renormalized top-1 weights are
constant (1), so the task loss gives the gate no gradient at top_k=1 (only the
load-balancing loss does); use top_k >= 2, a dense gate or renormalize=False to train top-1.
Ties in ``topk`` go to the lower expert index (torch's order).

Two gate modules produce the logits:

- `TokenGate`: one per adapted layer, z = W_g x from that layer's input x, per token
  (MixLoRA's ``gate_``: a bias-free linear router initialized N(0, 0.02²), its
  ``router_init_range``). MixLoRA routes whole FFN blocks from the block input; splice routes
  every adapted layer from its own input. MoLE (Wu et al. 2024) computes its gate from the
  concatenated *outputs* of the experts at each layer (softmax with a temperature); splice's
  token gate reads the layer input instead, so an unselected expert need not run.
- `SequenceGate`: one for the whole model, z = W h̄ + b from a pooled hidden state h̄ of the
  sequence (`splice.compose.mixture` says which), the same weights at every layer: X-LoRA's
  classifier of depth 1 with ``layerwise_scalings=False``, applied to the mean over the
  sequence's tokens rather than per token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

GATE_INIT_STD = 0.02  # MixLoRA's router_init_range


@dataclass(frozen=True)
class Routing:
    """One gate's decision at R routing positions (flattened leading dims).

    ``weights`` [..., N]: g (zeros outside the top-k); ``probs`` [..., N]: the full softmax p
    (what the load-balancing loss averages); ``chosen`` [..., k, N]: one-hot rows of the
    experts each position dispatches to (k = top_k; the argmax alone for a dense gate)."""

    weights: Tensor
    probs: Tensor
    chosen: Tensor


def route(logits: Tensor, top_k: int | None, renormalize: bool = True) -> Routing:
    """Softmax over the last axis (float32), then top-k keep and (by default) renormalize."""
    probs = torch.softmax(logits.float(), dim=-1)
    n = probs.shape[-1]
    if top_k is None:
        index = probs.argmax(dim=-1, keepdim=True)
        chosen = nn.functional.one_hot(index, n).to(probs.dtype)
        return Routing(probs, probs, chosen)
    kept, index = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        kept = kept / kept.sum(dim=-1, keepdim=True)
    weights = torch.zeros_like(probs).scatter(-1, index, kept)
    chosen = nn.functional.one_hot(index, n).to(probs.dtype)
    return Routing(weights, probs, chosen)


class TokenGate(nn.Module):
    """z = W_g x per token (bias-free, W_g ~ N(0, 0.02²)); x is cast to W_g's dtype."""

    def __init__(self, in_features: int, n_experts: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_experts, in_features))
        nn.init.normal_(self.weight, std=GATE_INIT_STD)

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.linear(x.to(self.weight.dtype), self.weight)


class SequenceGate(nn.Module):
    """z = W h̄ + b per sequence from its pooled hidden state h̄ (W ~ N(0, 0.02²), b = 0)."""

    def __init__(self, hidden_size: int, n_experts: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_experts, hidden_size))
        self.bias = nn.Parameter(torch.zeros(n_experts))
        nn.init.normal_(self.weight, std=GATE_INIT_STD)

    def forward(self, pooled: Tensor) -> Tensor:
        return nn.functional.linear(pooled.to(self.weight.dtype), self.weight, self.bias)
