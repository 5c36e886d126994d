"""`splice lorahub`: LoraHub composition of LoRA experts on a few examples.

splice lorahub BASE --adapter DIR --adapter DIR ... --data FILE --out DIR
               [--budget 40] [--seed 0] [--l1 0.05] [--max-examples N] [--max-length 512]

BASE: a causal LM (smollm2, an HF folder, a .gguf file). FILE: .jsonl / .csv / .tsv rows
with ``prompt`` and ``completion`` (loss on the completion) or ``text``. Writes a PEFT LoRA
folder of the composed adapter (`splice.compose.lorahub`) and prints the weights.
"""

from __future__ import annotations

import argparse
import json

from splice.commands._flags import add_output_flags


def _run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from splice.compose.lorahub import LoraExperts, LoraHubError, lorahub
    from splice.io.output_folder import OutputFolder
    from splice.numbers import check_number
    from splice.train.data import lm_batches, lm_examples_from_file
    from splice.train.models import load_for_task

    check_number(args.l1, "--l1", ge=0, error=LoraHubError)
    for flag in ("budget", "max_examples", "max_length", "batch_size", "threads"):
        value = getattr(args, flag)
        if value is not None:
            check_number(value, f"--{flag.replace('_', '-')}", ge=1, error=LoraHubError)
    OutputFolder(args.out, overwrite=args.overwrite, inputs=args.adapter).check()
    examples = lm_examples_from_file(Path(args.data))
    if args.max_examples:
        examples = examples[: args.max_examples]
    LoraExperts.load(args.adapter)  # checked before the model is loaded
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    model, tokenizer, _ = load_for_task(args.base, "causal_lm")
    batches = list(lm_batches(examples, tokenizer, args.batch_size, args.max_length))
    result = lorahub(
        model,
        args.adapter,
        batches,
        args.out,
        budget=args.budget,
        seed=args.seed,
        l1=args.l1,
        progress=not args.quiet,
        overwrite=args.overwrite,
        allow_nonfinite=args.allow_nonfinite,
    )
    for path, w in zip(result.adapters, result.weights, strict=True):
        print(f"{w:+.4f}  {path}")
    print(
        f"loss on {len(examples)} example(s): {result.base_loss:.4f} (base) -> "
        f"{result.loss:.4f} (composed), {result.evaluations} evaluations"
    )
    print(f"composed LoRA written to {args.out}")
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "lorahub",
        help="LoraHub: weights of a LoRA composition found by CMA-ES on a few examples",
        description=__doc__.splitlines()[0],
    )
    p.add_argument("base", metavar="BASE", help="the base causal LM: smollm2, a folder, a .gguf")
    p.add_argument(
        "--adapter", action="append", required=True, metavar="DIR", help="a LoRA expert, repeat"
    )
    p.add_argument("--data", required=True, help=".jsonl/.csv/.tsv: prompt+completion or text")
    p.add_argument("--budget", type=int, default=40, help="objective evaluations (40)")
    p.add_argument("--seed", type=int, default=0, help="CMA-ES seed (0)")
    p.add_argument("--l1", type=float, default=0.05, help="L1 coefficient on mean |w| (0.05)")
    p.add_argument("--max-examples", type=int, help="use the first N rows of --data")
    p.add_argument("--max-length", type=int, default=512, help="tokens per example (512)")
    p.add_argument("--batch-size", type=int, default=8, help="examples per forward (8)")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    add_output_flags(p, "output folder (a PEFT LoRA adapter)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(fn=_run)
