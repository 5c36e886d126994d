"""`splice search`: per-model (or per-layer-block) merge weights of a recipe found by CMA-ES,
or learned by AdaMerging (``--objective adamerging``).

splice search RECIPE --data FILE --out best.yaml [--objective lm-loss] [--budget 30]
              [--seed 0] [--patience N] [--layer-groups G] [--bounds 0,1] [--parameter weight]
              [--model REF] [--max-examples N] [--max-length 512] [--batch-size 8]
splice search RECIPE --objective adamerging|adamerging++ --out learned.yaml
              [--granularity layer|task] [--steps 500] [--lr 0.001] [--batches-per-step 2]
              [--init 0.3] [--no-clamp] [--seed 0] [--merged DIR] [--density 0.2 (++ only)]

Each candidate is the recipe with its models' weights replaced, merged in memory by the
engine (never written) and scored by the objective; the best recipe is written to --out and
`splice merge` runs it unchanged (`splice.engine.coefficient_search`). Objective: ``lm-loss``,
the mean causal-LM loss of the merged model on FILE (.jsonl / .csv / .tsv rows with ``text``
or ``prompt`` + ``completion``, or .txt lines; `splice.train.lm_objective`); the model's
architecture and tokenizer come from --model (default: the recipe's base_model, else its
first model).

``adamerging`` (`splice.train.adamerging_recipe`): the recipe is ``method: task_arithmetic``
over fine-tuned sequence classifiers, each model with ``data:`` (its task's unlabeled texts);
λ per model (task-wise) or per model and tensor (layer-wise) minimise the entropy of each
task's predictions through its own head (Adam, `splice.train.adamerging`), all in memory.
The learned weights are written as a task-arithmetic recipe; ``--merged DIR`` also writes
`splice merge`'s output of it (the base's model with the merged backbone, no expert head).
``adamerging++`` learns them on the TIES-processed task vectors (``--density``, the paper's
0.2; `splice.train.adamerging.ties_task_vectors`) and writes a ``method: ties`` recipe
(disjoint sum, sign elected on the unweighted trimmed vectors) that merges to the same.
"""

from __future__ import annotations

import argparse
import json
import uuid
from typing import Any

from splice.commands._flags import add_ray_flag

OBJECTIVES = ("lm-loss", "adamerging", "adamerging++")
ADAMERGING = ("adamerging", "adamerging++")
# Each objective's own flags and their defaults (argparse's default is None: "not given").
LM_LOSS_FLAGS: dict[str, Any] = {
    "data": None,
    "budget": 30,
    "patience": None,
    "layer_groups": 0,
    "bounds": "0,1",
    "parameter": "weight",
    "model": None,
    "max_examples": None,
    "max_length": 512,
    "batch_size": 8,
    "ray": None,
}
ADAMERGING_FLAGS: dict[str, Any] = {
    "granularity": "layer",
    "steps": 500,
    "lr": 1e-3,
    "batches_per_step": 2,
    "init": 0.3,
    "no_clamp": False,
    "merged": None,
    "density": None,  # adamerging++ only (its default: the paper's 0.2)
}


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


def _objective_flags(args: argparse.Namespace) -> None:
    """Refuse the other objective's flags; fill in this objective's defaults."""
    from splice.errors import SpliceError

    ada = args.objective in ADAMERGING
    own, other = (ADAMERGING_FLAGS, LM_LOSS_FLAGS) if ada else (LM_LOSS_FLAGS, ADAMERGING_FLAGS)
    if args.objective == "adamerging" and args.density is not None:
        raise SpliceError(
            "--density applies to --objective adamerging++ (the TIES trim of its task "
            "vectors); plain adamerging merges the whole task vectors"
        )
    for flag in other:
        if getattr(args, flag) not in (None, False):
            other_name = "lm-loss" if ada else "adamerging"
            if flag == "density":
                other_name = "adamerging++"
            hint = " (AdaMerging reads each model's `data:`)" if flag == "data" else ""
            raise SpliceError(
                f"--{flag.replace('_', '-')} applies to --objective {other_name}, not "
                f"{args.objective}{hint}"
            )
    for flag, default in own.items():
        if getattr(args, flag) is None:
            setattr(args, flag, default)
    if args.objective == "lm-loss" and args.data is None:
        raise SpliceError("--objective lm-loss needs --data FILE (the validation texts)")


def _check_out_file(args: argparse.Namespace) -> None:
    from pathlib import Path

    from splice.engine.coefficient_search import CoefficientSearchError

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise CoefficientSearchError(f"--out {out} exists (give --overwrite to replace it)")
    if out.is_dir() or not out.parent.is_dir():
        raise CoefficientSearchError(f"--out {out}: not a file in an existing folder")


def _run(args: argparse.Namespace) -> int:
    _objective_flags(args)
    if args.objective in ADAMERGING:
        return _adamerging(args)
    if args.ray is None:
        return _search(args)
    from splice.engine.ray_pool import ray_session

    _checks(args)  # the flags, --out and the recipe, before connecting
    with ray_session(args.ray):  # the address checked before the model is loaded
        return _search(args)


def _checks(args: argparse.Namespace) -> tuple[tuple[float, float], Any]:
    """The flags, --out and the recipe: (bounds, the parsed recipe)."""
    from splice.engine.coefficient_search import CoefficientSearchError, coefficient_space
    from splice.numbers import check_number

    for flag in ("budget", "max_examples", "max_length", "batch_size", "threads", "patience"):
        value = getattr(args, flag)
        if value is not None:
            check_number(value, f"--{flag.replace('_', '-')}", ge=1, error=CoefficientSearchError)
    check_number(args.layer_groups, "--layer-groups", ge=0, error=CoefficientSearchError)
    bounds = _bounds(args.bounds)
    _check_out_file(args)
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


def _adamerging(args: argparse.Namespace) -> int:
    """AdaMerging's coefficients learned on the recipe's data, written as a recipe."""
    from pathlib import Path

    from splice.engine.coefficient_search import recipe_yaml
    from splice.errors import SpliceError
    from splice.io.output_folder import write_file_atomically
    from splice.numbers import check_number
    from splice.train import adamerging_recipe as ar
    from splice.train.adamerging import PAPER_TIES_DENSITY, _check_settings

    if args.granularity not in ("task", "layer"):
        raise SpliceError(f"--granularity must be 'task' or 'layer', not {args.granularity!r}")
    check_number(args.steps, "--steps", ge=1, integer=True, error=SpliceError)
    check_number(args.batches_per_step, "--batches-per-step", ge=1, integer=True, error=SpliceError)
    check_number(args.lr, "--lr", gt=0, error=SpliceError)
    check_number(args.init, "--init", error=SpliceError)
    if args.threads is not None:
        check_number(args.threads, "--threads", ge=1, error=SpliceError)
    density = None
    if args.objective == "adamerging++":
        density = PAPER_TIES_DENSITY if args.density is None else args.density
        check_number(density, "--density", gt=0, le=1, error=SpliceError)
    clamp = None if args.no_clamp else (0.0, 1.0)
    _check_settings(
        args.granularity, args.init, clamp, args.lr, args.steps, args.batches_per_step, density
    )
    _check_out_file(args)
    # the recipe, data, models' configs and names
    prepared = ar.prepare(args.recipe, args.init, density)
    if args.merged is not None:
        ar.check_merged_out(args.merged, int(args.overwrite), prepared.recipe)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    learned = ar.learn(
        prepared,
        granularity=args.granularity,
        init=args.init,
        clamp=clamp,
        lr=args.lr,
        steps=args.steps,
        batches_per_step=args.batches_per_step,
        seed=args.seed,
        progress=not args.quiet,
    )
    out = Path(args.out)
    write_file_atomically(out, recipe_yaml(learned.recipe).encode("utf-8"))
    lam = learned.coefficients
    for k, model in enumerate(learned.models):
        if lam.dim() == 1:
            print(f"{float(lam[k]):.4f}  {model}")
        else:
            row = lam[k]
            print(
                f"{float(row.mean()):.4f}  {model}  (mean over {row.numel()} tensors, "
                f"min {float(row.min()):.4f}, max {float(row.max()):.4f})"
            )
    print(
        f"entropy: {learned.losses[0]:.4f} (first step) -> {learned.losses[-1]:.4f} (last step), "
        f"{len(learned.losses)} steps in {learned.seconds:.1f} s"
    )
    print(f"learned recipe written to {out}")
    if args.merged is not None:
        report = ar.write_merged(
            learned.recipe,
            args.merged,
            overwrite=int(args.overwrite),
            progress=not args.quiet,
            threads=args.threads,
        )
        print(
            f"merged model written to {report.out_dir}: the base's model with the merged "
            "backbone (no expert head: heads are per task)"
        )
    if args.json:
        if lam.dim() == 1:
            coefficients: dict[str, Any] = {m: float(v) for m, v in zip(learned.models, lam)}
        else:
            coefficients = {
                m: dict(zip(learned.layers, row.tolist())) for m, row in zip(learned.models, lam)
            }
        record = {
            "objective": args.objective,
            "granularity": args.granularity,
            "density": density,
            "coefficients": coefficients,
            "losses": list(learned.losses),
            "steps": len(learned.losses),
            "seconds": round(learned.seconds, 2),
            "recipe": str(out),
            "merged": None if args.merged is None else str(args.merged),
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
    p.add_argument("--out", required=True, help="where to write the best recipe (YAML)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing --out file (and a splice output at --merged)",
    )
    p.add_argument(
        "--objective",
        choices=OBJECTIVES,
        default="lm-loss",
        help="lm-loss: CMA-ES on the causal-LM loss of --data (default); adamerging: "
        "AdaMerging's entropy on each model's `data:`; adamerging++: the same on TIES-trimmed "
        "task vectors (docs/adamerging.md)",
    )
    p.add_argument("--seed", type=int, default=0, help="CMA-ES seed / AdaMerging batch order (0)")
    p.add_argument("--threads", type=int, help="torch CPU threads (with --ray: per task)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    lm = p.add_argument_group("lm-loss (CMA-ES)")
    lm.add_argument("--data", help=".jsonl/.csv/.tsv (text or prompt+completion), .txt")
    lm.add_argument("--budget", type=int, help="merges (objective evaluations) (30)")
    lm.add_argument("--patience", type=int, help="stop after N generations without improvement")
    lm.add_argument("--layer-groups", type=int, help="G > 0: a weight per block of layers (0)")
    lm.add_argument("--bounds", help="LOWER,UPPER of every weight (0,1)")
    lm.add_argument("--parameter", help="the per-model parameter (weight)")
    lm.add_argument("--model", help="model for the objective (default: base_model / first model)")
    lm.add_argument("--max-examples", type=int, help="use the first N rows of --data")
    lm.add_argument("--max-length", type=int, help="tokens per example (512)")
    lm.add_argument("--batch-size", type=int, help="examples per forward (8)")
    add_ray_flag(lm, "each CMA-ES generation's candidate merges")
    ada = p.add_argument_group(
        "adamerging",
        "RECIPE: method task_arithmetic, base_model, models that each give `data:` (unlabeled "
        "texts). Everything is held in memory: the experts, the base and K task vectors.",
    )
    ada.add_argument(
        "--granularity", help="layer: a λ per model and tensor (default); task: one per model"
    )
    ada.add_argument("--steps", type=int, help="Adam steps (500)")
    ada.add_argument("--lr", type=float, help="Adam learning rate (0.001)")
    ada.add_argument("--batches-per-step", type=int, help="batches of every task per step (2)")
    ada.add_argument("--init", type=float, help="start value of every λ (0.3)")
    ada.add_argument(
        "--no-clamp", action="store_true", default=None, help="λ not clamped to [0, 1]"
    )
    ada.add_argument(
        "--density",
        type=float,
        help="adamerging++: the fraction of each task vector's largest entries kept (0.2)",
    )
    ada.add_argument(
        "--merged",
        metavar="DIR",
        help="also write `splice merge`'s output of the learned recipe: the base's model "
        "with the merged backbone (no expert head)",
    )
    p.set_defaults(fn=_run)
