"""Choosing each request's next token from its logits: greedy, temperature and nucleus (top-p)
draws from a per-request seeded generator.

For logits z (one row, float32) and `SamplingParams` (T = temperature, p = top_p):

- T = 0: the argmax of z (greedy; the first index on ties, as ``torch.argmax``); so is any
  T below 1e-5 (its limit, and z / T would overflow float32);
- otherwise q = softmax(z / T); with p < 1 the *nucleus* is the smallest set of tokens, taken
  by decreasing q, whose total probability reaches p (token i of the sorted order is kept
  when the mass of the tokens before it is below p, so the most likely token always stays);
  q is set to 0 outside it and renormalised; the token is one draw from q with the request's
  own ``torch.Generator``.

Each request owns its generator (seeded with ``seed``, or from the OS when None), created on
the model's device, and only its own draws advance it: a seeded request draws the same tokens
whichever requests share its batch (its logits being the same, up to float rounding).
"""

from __future__ import annotations

import secrets

import torch
from torch import Tensor

from splice.serve.requests import SamplingParams

GREEDY_BELOW = 1e-5  # temperatures below this are greedy


def is_greedy(params: SamplingParams) -> bool:
    return params.temperature < GREEDY_BELOW


def request_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    """The request's generator (None for greedy requests, which draw nothing)."""
    if is_greedy(params):
        return None
    seed = params.seed if params.seed is not None else secrets.randbits(63)
    return torch.Generator(device=device).manual_seed(seed)


def nucleus_probs(logits: Tensor, temperature: float, top_p: float) -> Tensor:
    """The distribution a token is drawn from (module docstring), for 1-D float ``logits``."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p >= 1:
        return probs
    sorted_probs, order = torch.sort(probs, descending=True)
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    sorted_probs = torch.where(mass_before < top_p, sorted_probs, torch.zeros_like(sorted_probs))
    kept = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return kept / kept.sum()


def next_tokens(
    logits: Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
) -> list[int]:
    """One token per row of ``logits`` (rows × vocab) under that row's params and generator.

    The greedy rows share one argmax; each sampled row draws with its own generator. One
    device-to-host copy for the whole batch."""
    chosen = torch.argmax(logits, dim=-1)
    for row, (p, g) in enumerate(zip(params, generators, strict=True)):
        if is_greedy(p):
            continue
        probs = nucleus_probs(logits[row], p.temperature, p.top_p)
        chosen[row] = torch.multinomial(probs, 1, generator=g)[0]
    return [int(t) for t in chosen.tolist()]
