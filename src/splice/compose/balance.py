"""The load-balancing loss of a routed mixture (Switch Transformer, Fedus et al. 2021, eq. 4;
Mixtral's and MixLoRA's form for top-k).

Over T routing positions (tokens, or sequences for a sequence gate) and N experts:

    f_{s,i} = (1/T) Σ_t [expert i is position t's s-th choice]      s = 1..k
    P_i     = (1/T) Σ_t p_i(t)                                          (full softmax)
    L       = N · Σ_s Σ_i f_{s,i} · P_i

This is ``_mixtral_load_balancing_loss_func`` of MixLoRA's training code (TUDB-Labs mLoRA):
softmax of the concatenated router logits, ``topk``, one-hot, mean over tokens, times
``num_experts``; positions from every routed layer of one forward are concatenated before
the means (not a per-layer average). Padding positions are left out when a mask is given
(as transformers' Mixtral does with the attention mask). With k = 1 it is Switch's loss.

Uniform routing (p_i = 1/N) gives L = N · Σ_s Σ_i f_{s,i} / N = k. When every position
routes alike (one p, one top-k set K) L = N · Σ_{i∈K} p_i ≥ k, equal only for uniform p; a
gate sending everything to one expert with p → 1 gives L → N (top-1). A balanced dispatch
(f_{s,i} = 1/N) gives exactly k whatever P is: L is a surrogate whose gradient (through P
only; f is a count) lowers the probability of the overloaded experts.
A dense gate (top_k None) counts each position's argmax expert (k = 1), so the loss still
measures imbalance (Σ_i P_i = 1 makes the all-experts count constant).
"""

from __future__ import annotations

from torch import Tensor


def load_balancing_loss(probs: Tensor, chosen: Tensor, mask: Tensor | None = None) -> Tensor:
    """L above. ``probs`` [T, N]; ``chosen`` [T, k, N] one-hot; ``mask`` [T] (1 = counted).
    Zero when no position is counted."""
    n = probs.shape[0]
    weights = probs.new_ones(n) if mask is None else mask.to(probs.dtype).reshape(-1)
    total = weights.sum()
    if total == 0:
        return probs.new_zeros(())
    f = (chosen * weights[:, None, None]).sum(0) / total  # [k, N]
    p = (probs * weights[:, None]).sum(0) / total  # [N]
    return probs.shape[-1] * (f * p[None, :]).sum()
