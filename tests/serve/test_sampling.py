"""Per-request sampling: greedy argmax, temperature, the nucleus (top_p) set by its
definition, and reproducible draws from the request's own seeded generator."""

from __future__ import annotations

import math

import torch

from splice.serve.requests import SamplingParams
from splice.serve.sampling import next_tokens, nucleus_probs, request_generator


def test_nucleus_is_the_smallest_set_reaching_top_p() -> None:
    probs = torch.tensor([0.1, 0.4, 0.2, 0.3])
    logits = probs.log()
    # sorted: 0.4 (id 1), 0.3 (id 3), 0.2 (id 2), 0.1 (id 0); mass before: 0, .4, .7, .9
    torch.testing.assert_close(nucleus_probs(logits, 1.0, 0.7), torch.tensor([0, 4, 0, 3]) / 7)
    torch.testing.assert_close(
        nucleus_probs(logits, 1.0, 0.71), torch.tensor([0, 0.4, 0.2, 0.3]) / 0.9
    )
    torch.testing.assert_close(nucleus_probs(logits, 1.0, 0.05), torch.tensor([0.0, 1, 0, 0]))
    torch.testing.assert_close(nucleus_probs(logits, 1.0, 1.0), probs)


def test_temperature_divides_the_logits() -> None:
    logits = torch.tensor([0.0, 1.0, 2.0])
    want = torch.tensor([math.exp(0), math.exp(0.5), math.exp(1.0)])
    torch.testing.assert_close(nucleus_probs(logits, 2.0, 1.0), want / want.sum())


def test_greedy_rows_and_seeded_rows() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 50, generator=g)
    greedy = SamplingParams(temperature=1e-30)  # the limit of T -> 0: greedy, no overflow
    hot = SamplingParams(temperature=1.5, top_p=0.95, seed=3)
    gens = [None, request_generator(hot, torch.device("cpu")), None]
    assert request_generator(greedy, torch.device("cpu")) is None
    first = next_tokens(logits, [greedy, hot, greedy], gens)
    assert first[0] == int(logits[0].argmax()) and first[2] == int(logits[2].argmax())
    # the same seed draws the same sequence, whatever the other rows are
    draws = [next_tokens(logits[1:2], [hot], [request_generator(hot, torch.device("cpu"))])[0]]
    again = request_generator(hot, torch.device("cpu"))
    assert next_tokens(logits, [greedy, hot, greedy], [None, again, None])[1] == draws[0]
    seq_a = [next_tokens(logits[1:2], [hot], [gens[1]])[0] for _ in range(20)]
    seq_b = [next_tokens(logits[1:2], [hot], [again])[0] for _ in range(20)]
    assert seq_a == seq_b and len(set(seq_a)) > 1  # reproducible, and really sampled
