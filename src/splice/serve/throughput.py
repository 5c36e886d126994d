"""Decode throughput of the `BatchingEngine`: N concurrent greedy requests of ``--tokens`` new
tokens each (EOS ignored, so every request runs to its length), half of them with a LoRA
adapter, half on the base model.

    python -m splice.serve.throughput --model smollm2 --concurrency 1 16 --tokens 32

Prints, per concurrency, the generated tokens per second over the whole run (submit of the
first request to the end of the last, prefills included) and the decoding steps per second.
"""

from __future__ import annotations

import argparse
import time

import torch


def measure(am, tokenizer, concurrency: int, tokens: int, prompt: str) -> dict[str, float]:
    from splice.serve.engine import BatchingEngine
    from splice.serve.requests import GenerationRequest, SamplingParams

    engine = BatchingEngine(am, tokenizer, max_batch=max(concurrency, 1))
    engine.eos_ids = frozenset()  # run every request to its length
    ids = tokenizer(prompt).input_ids
    params = SamplingParams(max_tokens=tokens, temperature=0.0)
    engine.start()
    start = time.perf_counter()
    handles = [
        engine.submit(GenerationRequest(f"r{i}", ids, "lora" if i % 2 else None, params))
        for i in range(concurrency)
    ]
    generated = sum(sum(e.token_id is not None for e in h) for h in handles)
    seconds = time.perf_counter() - start
    steps = engine.stats.steps
    engine.stop()
    return {"tokens_per_s": generated / seconds, "steps_per_s": steps / seconds, "s": seconds}


def main(argv: list[str] | None = None) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from splice.adapters import AdapterModel, make_config
    from splice.train.models import resolve_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--prompt", default="Write a short story about a lighthouse keeper.")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    folder = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).to(args.device)
    am = AdapterModel(model).eval()
    am.add_adapter("lora", make_config("lora", {"r": 8, "target_modules": ["q_proj", "v_proj"]}))
    measure(am, tokenizer, 1, 4, args.prompt)  # warm-up
    for n in args.concurrency:
        r = measure(am, tokenizer, n, args.tokens, args.prompt)
        print(
            f"concurrency {n:3d}: {r['tokens_per_s']:8.1f} tokens/s, "
            f"{r['steps_per_s']:6.1f} steps/s ({r['s']:.2f} s, {args.device})"
        )


if __name__ == "__main__":
    main()
