"""`splice merge RECIPE --out DIR` (and `--continual`, OPCM): the streaming merge engine.

A recipe over PEFT LoRA adapter folders with a method that has a low-rank form writes a PEFT
LoRA adapter (`splice.lora_merge.recipe`); adapters among checkpoints are folded into the
base. The last line says which representation the output has."""

from __future__ import annotations

import argparse
import gc
from typing import TYPE_CHECKING

from splice.commands._flags import add_output_flags, output_options

if TYPE_CHECKING:
    from splice.recipe.schema import Recipe


def _check_out_early(out: str, overwrite: int | bool, recipe: Recipe) -> None:
    """The output refusal `run_merge` would give, before the minutes a recipe's ``data:``
    entries take to collect."""
    from splice.errors import CheckpointError
    from splice.io.out_location import check_out_location, input_paths, overwrite_refusal

    refusal = overwrite_refusal(
        check_out_location(out), out, int(overwrite), input_paths(recipe.model_references())
    )
    if refusal is not None:
        raise CheckpointError(refusal)


def _cmd_merge(args: argparse.Namespace) -> int:
    # Python's cycle collector is paused while torch and splice load (their imports set off
    # full collections over every object, ~0.3 s), and the objects alive by then are frozen
    # out of later collections: about 9% less CPU for a 0.15B TIES merge (2-vCPU machine).
    gc.disable()
    try:
        return _merge(args)
    finally:
        gc.enable()


def _merge(args: argparse.Namespace) -> int:
    from splice.engine import plan_merge, run_merge
    from splice.engine.heap import release_large_buffers
    from splice.io import parse_size
    from splice.lora_merge import route
    from splice.recipe.schema import load_recipe

    gc.freeze()  # what is loaded by now stays: later collections skip it
    gc.enable()
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
    routed = route(recipe)  # adapters only: a LoRA output; adapters among checkpoints: folded
    if routed.representation == "low_rank":
        return _cmd_merge_low_rank(args, routed.recipe)
    if routed.folded:
        recipe, text = routed.recipe, None
    shard = parse_size(args.shard_size)
    budget = parse_size(args.memory)
    collect = None
    if recipe.models and any(e.data is not None for e in recipe.models):
        from functools import partial

        from splice.train.statistics import collect_data_entries

        _check_out_early(args.out, args.overwrite, recipe)  # before collecting statistics
        collect = partial(collect_data_entries, progress=not args.quiet)
    plan = plan_merge(recipe, allow_nonfinite=args.allow_nonfinite, collect=collect)
    release_large_buffers()  # the peak RSS follows --memory (splice.engine.heap)
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
    folded = f"; LoRA adapters folded into the base: {', '.join(routed.folded)}"
    print(
        f"merged {report.tensors} tensors{resumed} with '{recipe.method_name}' into "
        f"{report.out_dir} in {report.seconds:.1f} s "
        f"(read {report.bytes_read / 1e6:.0f} MB, wrote {report.bytes_written / 1e6:.0f} MB): "
        f"a dense checkpoint{folded if routed.folded else ''}"
    )
    return 0


def _cmd_merge_low_rank(args: argparse.Namespace, recipe: Recipe) -> int:
    """A recipe over PEFT LoRA adapter folders with a low-rank method: a LoRA adapter out."""
    from splice.commands.lora import low_rank_summary
    from splice.errors import MergeValidationError
    from splice.lora_merge import merge_low_rank_recipe

    if args.resume:
        raise MergeValidationError("--resume applies to checkpoint merges, not LoRA outputs")
    report = merge_low_rank_recipe(
        recipe, args.out, overwrite=args.overwrite, allow_nonfinite=args.allow_nonfinite
    )
    print(low_rank_summary(len(recipe.models or []), report))
    return 0


def _cmd_merge_continual(args: argparse.Namespace) -> int:
    """`splice merge --continual STATE|none --base B --add MODEL --out DIR` (OPCM)."""
    from splice.engine.continual import opcm_add
    from splice.errors import MergeValidationError

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
        **output_options(args),
    )
    print(
        f"merged model {report.models_merged} into {report.out_dir} with OPCM "
        f"(lambda {report.lambda_:.4g}, {report.tensors} tensors)"
    )
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    m = sub.add_parser("merge", help="merge checkpoints with a recipe (mergekit YAML accepted)")
    m.add_argument("recipe", nargs="?", default=None, help="recipe YAML file")
    add_output_flags(
        m,
        "output folder (HF layout), written aside and renamed into place when complete; "
        "a second run into the same --out is refused while one is running",
        shard_size=True,
    )
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
    m.set_defaults(fn=_cmd_merge)
