"""`splice search`: per-model (or per-layer-block) merge weights of a recipe found by CMA-ES.

splice search RECIPE --data FILE --out best.yaml [--objective lm-loss] [--budget 30]
              [--seed 0] [--patience N] [--layer-groups G] [--bounds 0,1] [--parameter weight]
              [--model REF] [--max-examples N] [--max-length 512] [--batch-size 8]

Each candidate is the recipe with its models' weights replaced, merged in memory by the
engine (never written) and scored by the objective; the best recipe is written to --out and
`splice merge` runs it unchanged (`splice.engine.coefficient_search`). Objective: ``lm-loss``,
the mean causal-LM loss of the merged model on FILE (.jsonl / .csv / .tsv rows with ``text``
or ``prompt`` + ``completion``, or .txt lines; `splice.train.lm_objective`); the model's
architecture and tokenizer come from --model (default: the recipe's base_model, else its
first model).
"""

from __future__ import annotations

import argparse
import json
import uuid
from typing import Any

from splice.commands._flags import add_ray_flag

OBJECTIVES = ("lm-loss",)


def _bounds(text: str) -> tuple[float, float]:
    from splice.errors import SpliceError
    from splice.numbers import check_number

    parts = text.split(",")
    try:
        lo, hi = (float(v) for v in parts)
    except ValueError:
        raise SpliceError(f"--bounds: expected LOWER,UPPER (two numbers), got {text!r}") from None
    check_number(lo, "--bounds lower", error=SpliceError)
    check_number(hi, "--bounds upper", error=SpliceError)
    if not lo < hi:
        raise SpliceError(f"--bounds: lower must be below upper, got {text!r}")
    return lo, hi


def _run(args: argparse.Namespace) -> int:
    if args.ray is None:
        return _search(args)
    from splice.engine.ray_pool import ray_session

    _checks(args)  # the flags, --out and the recipe, before connecting
    with ray_session(args.ray):  # the address checked before the model is loaded
        return _search(args)


def _checks(args: argparse.Namespace) -> tuple[tuple[float, float], Any]:
    """The flags, --out and the recipe: (bounds, the parsed recipe)."""
    from pathlib import Path

    from splice.engine.coefficient_search import CoefficientSearchError, coefficient_space
    from splice.numbers import check_number

    for flag in ("budget", "max_examples", "max_length", "batch_size", "threads", "patience"):
        value = getattr(args, flag)
        if value is not None:
            check_number(value, f"--{flag.replace('_', '-')}", ge=1, error=CoefficientSearchError)
    check_number(args.layer_groups, "--layer-groups", ge=0, error=CoefficientSearchError)
    bounds = _bounds(args.bounds)
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise CoefficientSearchError(f"--out {out} exists (give --overwrite to replace it)")
    if out.is_dir() or not out.parent.is_dir():
        raise CoefficientSearchError(f"--out {out}: not a file in an existing folder")
    _, parsed, _ = coefficient_space(  # the recipe checked before the model is loaded
        args.recipe, parameter=args.parameter, layer_groups=args.layer_groups, bounds=bounds
    )
    return bounds, parsed


def _search(args: argparse.Namespace) -> int:
    from functools import partial
    from pathlib import Path

    from tqdm.auto import tqdm

    from splice.engine.coefficient_search import search_coefficients
    from splice.io.output_folder import write_file_atomically
    from splice.train.lm_objective import LMLossObjective

    bounds, parsed = _checks(args)
    out = Path(args.out)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    model_ref = args.model or parsed.base_model or parsed.models[0].model  # type: ignore[index]
    factory = partial(
        LMLossObjective.from_file,
        model_ref,
        args.data,
        max_examples=args.max_examples,
        max_length=args.max_length,
        batch_size=args.batch_size,
    )
    objective = factory()  # also on the driver under --ray: its errors before any merge
    evaluate_many = None
    if args.ray is not None:  # each generation's candidates as parallel Ray tasks
        from splice.engine.ray_pool import RayPool, candidate_evaluator

        pool = RayPool(args.threads or 1)
        evaluate_many = candidate_evaluator(pool, factory, f"search-{uuid.uuid4().hex}")
    bar = tqdm(total=args.budget, desc="search", unit="merge", disable=args.quiet, leave=False)

    def tick(_: int, __: float, best: float) -> None:
        bar.update(1)
        bar.set_postfix(best=f"{best:.4f}", refresh=False)

    try:
        found = search_coefficients(
            args.recipe,
            objective,
            budget=args.budget,
            seed=args.seed,
            bounds=bounds,
            parameter=args.parameter,
            layer_groups=args.layer_groups,
            patience=args.patience,
            keep_state=False,
            on_evaluation=tick,
            evaluate_many=evaluate_many,
        )
    finally:
        bar.close()
    write_file_atomically(out, found.recipe_yaml().encode("utf-8"))
    for label, value in found.coefficients.items():
        print(f"{value:.4f}  {label}")
    stop = " (early stop)" if found.stopped == "patience" else ""
    print(
        f"lm-loss: {found.start_value:.4f} (start) -> {found.value:.4f} (best), "
        f"{found.evaluations} merges in {found.seconds:.1f} s{stop}"
    )
    print(f"best recipe written to {out}")
    if args.json:
        record = {
            "coefficients": found.coefficients,
            "objective": "lm-loss",
            "start_value": found.start_value,
            "value": found.value,
            "evaluations": found.evaluations,
            "generations": found.generations,
            "stopped": found.stopped,
            "seconds": round(found.seconds, 2),
            "recipe": str(out),
        }
        print(json.dumps(record, indent=2))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "search",
        help="coefficient search: a recipe's model weights by CMA-ES on a validation objective",
        description=__doc__.splitlines()[0],
    )
    p.add_argument("recipe", metavar="RECIPE", help="merge recipe (YAML) whose weights to search")
    p.add_argument(
        "--data", required=True, help=".jsonl/.csv/.tsv (text or prompt+completion), .txt"
    )
    p.add_argument("--out", required=True, help="where to write the best recipe (YAML)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument(
        "--objective", choices=OBJECTIVES, default="lm-loss", help="what to minimise (lm-loss)"
    )
    p.add_argument("--budget", type=int, default=30, help="merges (objective evaluations) (30)")
    p.add_argument("--seed", type=int, default=0, help="CMA-ES seed (0)")
    p.add_argument("--patience", type=int, help="stop after N generations without improvement")
    p.add_argument(
        "--layer-groups", type=int, default=0, help="G > 0: a weight per block of layers (0)"
    )
    p.add_argument("--bounds", default="0,1", help="LOWER,UPPER of every weight (0,1)")
    p.add_argument("--parameter", default="weight", help="the per-model parameter (weight)")
    p.add_argument("--model", help="model for the objective (default: base_model / first model)")
    p.add_argument("--max-examples", type=int, help="use the first N rows of --data")
    p.add_argument("--max-length", type=int, default=512, help="tokens per example (512)")
    p.add_argument("--batch-size", type=int, default=8, help="examples per forward (8)")
    p.add_argument("--threads", type=int, help="torch CPU threads (with --ray: per task)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    add_ray_flag(p, "each CMA-ES generation's candidate merges")
    p.set_defaults(fn=_run)
