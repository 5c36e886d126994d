"""`splice align --reference DIR --model DIR --out DIR [--spec SPEC]`: permute a model's hidden
units to match a reference by weight matching (Git Re-Basin), e.g. before averaging two models
trained from different starts. SPEC: mlp, llama or llama-residual. See docs/alignment.md."""

from __future__ import annotations

import argparse

from splice.commands._flags import add_output_flags, output_options


def _cmd_align(args: argparse.Namespace) -> int:
    from splice.merge.align.folders import align_folders

    result = align_folders(
        args.reference,
        args.model,
        args.out,
        spec_name=args.spec,
        max_iter=args.max_iter,
        seed=args.seed,
        **output_options(args),
    )
    state = "converged" if result.converged else "stopped at --max-iter"
    print(
        f"aligned {args.model} to {args.reference} ({len(result.perms)} permutations, "
        f"{result.iterations} iterations, {state}): Σ<W_ref, W> "
        f"{result.objective_before:.6g} -> {result.objective_after:.6g}; wrote {args.out}"
    )
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "align",
        help="permute a model's hidden units to match a reference (weight matching)",
        description=__doc__.splitlines()[0],
    )
    p.add_argument("--reference", required=True, help="the model to match (folder or file)")
    p.add_argument("--model", required=True, help="the model to permute (folder or file)")
    p.add_argument(
        "--spec",
        default="mlp",
        help="which units to permute: mlp (a chain of linear layers), llama (decoder blocks: "
        "MLP intermediate units and attention heads) or llama-residual (also the residual "
        "stream); default mlp",
    )
    p.add_argument("--max-iter", type=int, default=100, help="coordinate-descent sweeps (100)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sweep order (0)")
    add_output_flags(p, shard_size=True)
    p.set_defaults(fn=_cmd_align)
