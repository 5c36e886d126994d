"""`splice stats`: collect a model's Fisher or Gram statistics on data, for the data-aware
merge methods (a recipe's ``statistics:`` file).

splice stats fisher MODEL --data D --out F.safetensors   diagonal empirical Fisher
splice stats gram MODEL --data D --out F.safetensors     RegMean Gram matrices
"""

from __future__ import annotations

import argparse

from splice.commands._flags import add_overwrite_argument


def _run(args: argparse.Namespace) -> int:
    from splice.train.statistics import StatsRequest, collect_statistics

    result = collect_statistics(
        StatsRequest(
            kind=args.kind,
            model=args.model,
            data=args.data,
            out=args.out,
            task=args.task,
            split=args.split,
            seed=args.seed,
            max_examples=args.max_examples,
            batch_size=args.batch_size,
            max_length=args.max_length,
            per_example=not args.batch_fisher,
            reduction=args.reduction,
            exclude=tuple(args.exclude or ()),
            overwrite=bool(args.overwrite),
            progress=not args.quiet,
        )
    )
    print(
        f"wrote {result.path}: {result.kind} statistics of {result.tensors} tensors "
        f"({result.bytes / 2**20:.1f} MiB) from {result.examples:,} examples ({result.task})"
    )
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "stats",
        help="collect Fisher or Gram statistics of a model on data (for fisher / regmean merges)",
    )
    p.add_argument(
        "kind",
        choices=["fisher", "gram"],
        help="fisher: diagonal empirical Fisher (fisher merging); gram: input Gram matrices of "
        "every linear layer (regmean)",
    )
    p.add_argument("model", help="HF model folder (a sequence classifier or a causal LM)")
    p.add_argument(
        "--data",
        required=True,
        help="built-in task name, or a .csv/.tsv/.jsonl file (text + label for a classifier; "
        "text, or prompt + completion, for a causal LM)",
    )
    p.add_argument("--out", required=True, help="statistics file to write (.safetensors)")
    p.add_argument(
        "--task", choices=["seq_cls", "causal_lm"], help="model kind (default: from config.json)"
    )
    p.add_argument(
        "--split",
        choices=["all", "train", "validation", "test"],
        help="part of the seeded 80/10/10 split of `splice train` (default: train for a "
        "built-in task, all for a file)",
    )
    p.add_argument("--seed", type=int, default=0, help="split seed (0, as splice train)")
    p.add_argument("--max-examples", type=int, help="use the first N examples (all)")
    p.add_argument("--batch-size", type=int, default=8, help="examples per batch (8)")
    p.add_argument("--max-length", type=int, default=128, help="tokens per example (128)")
    p.add_argument(
        "--batch-fisher",
        action="store_true",
        help="fisher: square each batch's summed gradient (one backward per batch, adds cross "
        "terms) instead of each example's gradient",
    )
    p.add_argument(
        "--reduction",
        choices=["mean", "sum"],
        default="mean",
        help="gram: divide by the row count (mean, FusionBench) or keep XᵀX (sum)",
    )
    p.add_argument(
        "--exclude",
        action="append",
        metavar="REGEX",
        help="gram: skip linear modules whose name matches (e.g. classifier), repeatable",
    )
    add_overwrite_argument(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(fn=_run)
