"""`splice lora ...`: LoRA-native merging, extraction, reversible merging and ComPEFT.

splice lora merge --method M ADAPTER1 ADAPTER2 ... [--weights ..] [--rank R]
                  [--density D] [--lambda L] [--seed S] --out DIR
                  (= `splice merge` of the recipe `method: lora:M` over the adapters)
splice lora extract --base B --model FT (--rank R | --energy E) --out DIR
splice lora rmm ADAPTER1 ... --k K --out STORE
splice lora rmm-recover STORE --task I --out DIR
splice lora compeft ADAPTER --density D [--alpha A] --out DIR
splice lora methods
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from splice.commands._flags import (
    add_allow_nonfinite,
    add_output_flags,
    add_overwrite_argument,
    output_options,
)

if TYPE_CHECKING:
    from splice.lora_merge import LoraMergeReport


def _merge(args: argparse.Namespace) -> int:
    """A thin alias of `splice merge` over adapters: the recipe `lora:METHOD` of the adapters,
    each with its weight, and the given global parameters."""
    from splice.errors import MergeValidationError
    from splice.lora_merge import merge_low_rank_recipe
    from splice.numbers import check_number, check_numbers
    from splice.recipe.schema import parse_recipe

    weights = check_numbers(args.weights or [1.0] * len(args.adapters), "weights")
    if len(weights) != len(args.adapters):
        raise MergeValidationError(
            f"{len(weights)} weights for {len(args.adapters)} adapters; give one weight per adapter"
        )
    given = {"rank": args.rank, "density": args.density, "lambda": args.lambda_}
    for key, value in given.items():  # finite here (one line); ranges: the method's schema
        if value is not None:
            check_number(value, key)
    recipe = {
        "method": f"lora:{args.method}",
        "models": [
            {"model": a, "parameters": {"weight": w}} for a, w in zip(args.adapters, weights)
        ],
        "parameters": {k: v for k, v in given.items() if v is not None},
        "seed": args.seed,
    }
    report = merge_low_rank_recipe(
        parse_recipe(recipe, "splice lora merge"),
        args.out,
        overwrite=args.overwrite,
        allow_nonfinite=args.allow_nonfinite,
    )
    print(low_rank_summary(len(args.adapters), report))
    return 0


def low_rank_summary(n: int, report: LoraMergeReport) -> str:
    """The line saying what a low-rank merge wrote (`splice lora merge`, `splice merge`)."""
    ranks = sorted(set(report.ranks.values()))
    shown = ", ".join(map(str, ranks[:6])) + (" ..." if len(ranks) > 6 else "")
    return (
        f"merged {n} adapters ({report.modules} modules) with '{report.method}' into "
        f"{report.out_dir}: a PEFT LoRA adapter (ranks: {shown})"
    )


def _extract(args: argparse.Namespace) -> int:
    from splice.lora_merge.extract import DEFAULT_EXCLUDE, extract_lora

    report = extract_lora(
        args.base,
        args.model,
        args.out,
        rank=args.rank,
        energy=args.energy,
        max_rank=args.max_rank,
        targets=args.targets,
        exclude=DEFAULT_EXCLUDE if args.exclude is None else (args.exclude or None),
        fan_in_fan_out=args.fan_in_fan_out,
        oversample=args.oversample,
        niter=args.niter,
        seed=args.seed,
        **output_options(args),
    )
    for t in report.tensors:
        print(f"{t.name}\trank {t.rank}\trelative error {t.rel_error:.4g}")
    for name, why in report.skipped:
        print(f"skipped {name}: {why}")
    worst = max(t.rel_error for t in report.tensors)
    print(
        f"extracted {len(report.tensors)} tensors into {report.out_dir} "
        f"(worst relative error {worst:.4g}; {report.unchanged} unchanged, "
        f"{len(report.skipped)} skipped)"
    )
    return 0


def _rmm(args: argparse.Namespace) -> int:
    from splice.lora_merge.rmm import build_rmm

    out = build_rmm(args.adapters, args.k, args.out, **output_options(args))
    print(f"stored {len(args.adapters)} adapters as {args.k} basis models in {out}")
    return 0


def _rmm_recover(args: argparse.Namespace) -> int:
    from splice.lora_merge.rmm import recover_adapter

    out = recover_adapter(args.store, args.task, args.out, **output_options(args))
    print(f"recovered task {args.task} into {out}")
    return 0


def _compeft(args: argparse.Namespace) -> int:
    from splice.compress.compeft import compeft_adapter

    entries, errors = compeft_adapter(
        args.adapter,
        args.out,
        density=args.density,
        alpha=args.alpha,
        std_of=args.std_of,
        **output_options(args),
    )
    dense = sum(e.bits["dense"] for e in entries)
    entropy = sum(e.bits["entropy"] for e in entries)
    two_bit = sum(e.bits["ternary_2bit"] for e in entries)
    worst = max(errors.values())
    print(
        f"compressed {len(entries)} LoRA factors into {args.out}: {dense / 8e6:.3f} MB dense -> "
        f"{entropy / 8e6:.3f} MB entropy-coded ({dense / entropy:.1f}x), "
        f"{two_bit / 8e6:.3f} MB at 2 bits/entry; worst module ΔW relative error {worst:.4g}"
    )
    return 0


def _methods(args: argparse.Namespace) -> int:
    from splice.commands.methods import low_rank_section

    print(low_rank_section())
    return 0


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a list of numbers") from None


def register(sub: argparse._SubParsersAction) -> None:
    lora = sub.add_parser("lora", help="merge, extract, compress PEFT LoRA adapters")
    lsub = lora.add_subparsers(dest="lora_cmd", required=True)

    m = lsub.add_parser(
        "merge", help="merge PEFT LoRA adapters into one adapter (a recipe of lora:METHOD)"
    )
    m.add_argument("adapters", nargs="+", help="PEFT LoRA adapter folders of the same base")
    m.add_argument("--method", required=True, help="concat, svd, ties, dare, dare_ties, knots, ...")
    m.add_argument("--weights", type=_floats, help="one weight per adapter (default 1 each)")
    m.add_argument("--rank", type=int, help="output rank (default: max input rank)")
    m.add_argument("--density", type=float, help="fraction kept by ties/dare/knots")
    m.add_argument("--lambda", dest="lambda_", type=float, help="global scale (default 1)")
    m.add_argument("--seed", type=int, default=0, help="seed for DARE masks and k-means")
    m.add_argument("--out", required=True, help="output adapter folder")
    add_overwrite_argument(m)
    add_allow_nonfinite(m)
    m.set_defaults(fn=_merge)

    e = lsub.add_parser("extract", help="extract a LoRA adapter from a full fine-tune")
    e.add_argument("--base", required=True, help="base checkpoint (file or folder)")
    e.add_argument("--model", required=True, help="fine-tuned checkpoint")
    g = e.add_mutually_exclusive_group(required=True)
    g.add_argument("--rank", type=int, help="rank of every extracted LoRA")
    g.add_argument("--energy", type=float, help="keep this fraction of ‖ΔW‖² per tensor")
    e.add_argument("--max-rank", type=int, help="cap on the rank with --energy")
    e.add_argument("--targets", help="regex: only modules whose name matches")
    e.add_argument("--exclude", help="regex of modules to skip (default: embeddings; '' none)")
    e.add_argument("--fan-in-fan-out", action="store_true", help="weights stored in×out (GPT-2)")
    e.add_argument("--oversample", type=int, default=10, help="randomized SVD oversampling")
    e.add_argument("--niter", type=int, default=2, help="randomized SVD power iterations")
    e.add_argument("--seed", type=int, default=0)
    add_output_flags(e, "output adapter folder")
    e.set_defaults(fn=_extract)

    r = lsub.add_parser("rmm", help="store adapters as k basis models + per-task coefficients")
    r.add_argument("adapters", nargs="+")
    r.add_argument("--k", type=int, required=True, help="number of basis models")
    add_output_flags(r, "output store folder")
    r.set_defaults(fn=_rmm)

    rr = lsub.add_parser("rmm-recover", help="recover one task's adapter from an RMM store")
    rr.add_argument("store")
    rr.add_argument("--task", type=int, required=True, help="task index (order given to rmm)")
    add_output_flags(rr, "output adapter folder")
    rr.set_defaults(fn=_rmm_recover)

    c = lsub.add_parser("compeft", help="ComPEFT: sparse ternary compression of an adapter")
    c.add_argument("adapter")
    c.add_argument("--density", type=float, required=True, help="fraction of entries kept")
    c.add_argument("--alpha", type=float, default=1.0, help="scale multiplier α (default 1)")
    c.add_argument("--std-of", choices=["original", "sparse"], default="original")
    add_output_flags(c, "output adapter folder")
    c.set_defaults(fn=_compeft)

    ls = lsub.add_parser("methods", help="list the LoRA merge methods")
    ls.set_defaults(fn=_methods)
