"""The `splice` command line. Thin: parse flags, call the library, print.

Exit code 0 on success, 1 on a SpliceError or another expected failure such as an OS error
(one line on stderr, ``splice: error: ...``; the traceback only with --debug), 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Sequence

from splice import __version__
from splice.commands._flags import add_allow_nonfinite
from splice.errors import SpliceError, expected_failure


def _cmd_merge(args: argparse.Namespace) -> int:
    from splice.engine import plan_merge, run_merge
    from splice.io import parse_size
    from splice.recipe.schema import load_recipe

    if args.continual is not None or args.recipe is None:
        return _cmd_merge_continual(args)
    recipe, text = load_recipe(args.recipe)
    update: dict[str, object] = {}
    if args.dtype:
        update["out_dtype"] = args.dtype
    if args.seed is not None:
        update["seed"] = args.seed
    if update:
        recipe = recipe.model_copy(update=update)
        text = None  # the stored recipe must be the one that ran
    shard = parse_size(args.shard_size)
    budget = parse_size(args.memory)
    plan = plan_merge(recipe, allow_nonfinite=args.allow_nonfinite)
    try:
        report = run_merge(
            plan,
            args.out,
            shard_bytes=shard,
            threads=args.threads,
            resume=args.resume,
            overwrite=args.overwrite,
            recipe_text=text,
            progress=not args.quiet,
            memory_budget=budget,
        )
    finally:
        plan.close()
    resumed = f", {report.skipped} already done" if report.skipped else ""
    print(
        f"merged {report.tensors} tensors{resumed} with '{recipe.method_name}' into "
        f"{report.out_dir} in {report.seconds:.1f} s "
        f"(read {report.bytes_read / 1e6:.0f} MB, wrote {report.bytes_written / 1e6:.0f} MB)"
    )
    return 0


def _cmd_merge_continual(args: argparse.Namespace) -> int:
    """`splice merge --continual STATE|none --base B --add MODEL --out DIR` (OPCM)."""
    from splice.errors import MergeValidationError
    from splice.io import parse_size
    from splice.merge.continual.stream import opcm_add

    if args.continual is None:
        raise MergeValidationError("splice merge needs a recipe, or --continual STATE|none")
    if args.recipe is not None:
        raise MergeValidationError("--continual takes no recipe (it merges with OPCM)")
    if not args.base or not args.add:
        raise MergeValidationError("--continual needs --base BASE and --add MODEL")
    state = None if args.continual.lower() == "none" else args.continual
    report = opcm_add(
        args.base,
        state,
        args.add,
        args.out,
        alpha=args.alpha,
        shard_bytes=parse_size(args.shard_size),
        overwrite=args.overwrite,
        allow_nonfinite=args.allow_nonfinite,
    )
    print(
        f"merged model {report.models_merged} into {report.out_dir} with OPCM "
        f"(lambda {report.lambda_:.4g}, {report.tensors} tensors)"
    )
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from splice.inspect_ckpt import compare, human_bytes, summarize
    from splice.io import open_checkpoint

    a = open_checkpoint(args.path)
    try:
        if args.other is None:
            s, rows = summarize(a)
            if not args.summary:
                width = max((len(r[0]) for r in rows), default=4)
                for name, shape, dt in rows:
                    print(f"{name:<{width}}  {list(shape)!s:<20} {dt}")
            print(
                f"{s.tensors} tensors, {s.parameters:,} parameters, {human_bytes(s.bytes)}; "
                + ", ".join(f"{k}: {v:,}" for k, v in s.dtypes.items())
            )
            return 0
        b = open_checkpoint(args.other)
        try:
            rows, only_a, only_b = compare(a, b)
        finally:
            b.close()
        width = max((len(r.name) for r in rows), default=4)
        print(f"{'tensor':<{width}}  {'|b-a|':>10} {'|b-a|/|a|':>10} {'cos(a,b)':>9}")
        for r in rows:
            print(f"{r.name:<{width}}  {r.delta_norm:>10.4g} {r.relative:>10.4g} {r.cosine:>9.5f}")
        total = sum(r.delta_norm**2 for r in rows if r.delta_norm == r.delta_norm) ** 0.5
        print(
            f"{len(rows)} shared tensors, total |b-a| = {total:.4g}; "
            f"only in {args.path}: {len(only_a)}, only in {args.other}: {len(only_b)}"
        )
        for n in only_a[:5]:
            print(f"  only in first: {n}")
        for n in only_b[:5]:
            print(f"  only in second: {n}")
        return 0
    finally:
        a.close()


def _cmd_demo(args: argparse.Namespace) -> int:
    if args.synthetic:
        from splice.demo import run_demo

        run_demo(args.out, progress=not args.quiet)
    else:
        from splice.demo import run_bench_demo

        run_bench_demo(args.out, progress=not args.quiet)
    return 0


def _cmd_methods(args: argparse.Namespace) -> int:
    from splice.merge.reference import method_summaries, method_table

    print(method_summaries())
    print()
    print(method_table())
    return 0


def build_parser() -> argparse.ArgumentParser:
    from splice.commands import add_overwrite_argument

    p = argparse.ArgumentParser(prog="splice", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"splice {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = p.add_subparsers(dest="command", required=True)

    m = sub.add_parser("merge", help="merge checkpoints with a recipe (mergekit YAML accepted)")
    m.add_argument("recipe", nargs="?", default=None, help="recipe YAML file")
    m.add_argument(
        "--out",
        required=True,
        help="output folder (HF layout), written aside and renamed into place when complete; "
        "a second run into the same --out is refused while one is running",
    )
    m.add_argument("--shard-size", default="2GB", help="max bytes per output shard (2GB)")
    m.add_argument(
        "--dtype",
        choices=["float32", "float16", "bfloat16", "float64"],
        help="output dtype (overrides the recipe's out_dtype)",
    )
    m.add_argument("--threads", type=int, default=None, help="worker threads (min(4, cores))")
    m.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted merge into the same --out: finished shards are kept only "
        "when their bytes and the inputs they were made from are unchanged (checked by "
        "content: one read of those inputs and shards)",
    )
    add_overwrite_argument(m)
    m.add_argument("--seed", type=int, default=None, help="seed for random methods")
    m.add_argument(
        "--memory",
        default="1GB",
        help="cap on the estimated memory of tensors being merged at once (1GB); "
        "a tensor needing more runs alone",
    )
    m.add_argument("--quiet", action="store_true", help="no progress bar")
    m.add_argument(
        "--continual",
        metavar="STATE",
        default=None,
        help="continual merging (OPCM), no recipe: the previous state folder, or 'none' "
        "to start with --add; writes the new state to --out",
    )
    m.add_argument("--base", default=None, help="with --continual: the base model")
    m.add_argument("--add", default=None, help="with --continual: the model to merge in")
    m.add_argument(
        "--alpha",
        type=float,
        default=None,
        help="with --continual: OPCM's subspace threshold (the state's, 0.5 at first)",
    )
    add_allow_nonfinite(m)
    m.set_defaults(fn=_cmd_merge)

    i = sub.add_parser("inspect", help="list a checkpoint's tensors, or compare two")
    i.add_argument("path")
    i.add_argument("other", nargs="?", default=None)
    i.add_argument("--summary", action="store_true", help="totals only")
    i.set_defaults(fn=_cmd_inspect)

    r = sub.add_parser("methods", help="list merge methods with their parameters and defaults")
    r.set_defaults(fn=_cmd_methods)

    d = sub.add_parser(
        "demo",
        help="a short real benchmark: MiniLM experts on 3 tasks, merged with the core "
        "methods, accuracy table and plots (--synthetic: the synthetic Llama merge demo)",
    )
    d.add_argument("--out", default="splice-demo", help="work folder (splice-demo)")
    d.add_argument(
        "--synthetic",
        action="store_true",
        help="the synthetic demo: a small Llama-shaped model and three structured "
        "fine-tunes, merged with every core method (no data, no model download)",
    )
    d.add_argument("--quiet", action="store_true")
    d.set_defaults(fn=_cmd_demo)

    from splice.commands import register_all

    register_all(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command. A `SpliceError` prints ``splice: error: MSG`` and exits 1; so does
    an expected failure that is not one (an OS error, undecodable text, a YAML / JSON
    syntax error, too-deep nesting, an invalid regular expression, a CSV error, a pydantic
    validation error; see `splice.errors.expected_failure`). Anything else is a bug and
    keeps its traceback. Ctrl-C exits 130. ``--debug`` prints the traceback of every error.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if getattr(args, "threads", None) is not None and args.threads < 1:
            raise SpliceError("--threads must be at least 1")
        return int(args.fn(args))
    except SpliceError as e:
        if args.debug:
            traceback.print_exc()
        print(f"splice: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("splice: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        message = expected_failure(e)
        if message is None:
            raise
        if args.debug:
            traceback.print_exc()
        print(f"splice: error: {' '.join(message.split())}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
