"""`splice data`: list the built-in labeled text tasks, show one, or save a split.

splice data list                     each task: installed?, size, classes
splice data show NAME|FILE           counts per class and 3 examples
splice data split NAME|FILE --out F  a seeded stratified split saved as JSON
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from splice.errors import DataError


def _parse_options(items: list[str] | None) -> dict[str, Any]:
    """``["min_confidence=0.6", "dedupe=false"]`` -> ``{"min_confidence": 0.6, ...}``."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise DataError(f"--option expects KEY=VALUE, got {item!r}")
        value: Any = raw
        if raw.lower() in ("true", "false"):
            value = raw.lower() == "true"
        else:
            for cast in (int, float):
                try:
                    value = cast(raw)
                    break
                except ValueError:
                    pass
            if isinstance(value, float) and not math.isfinite(value):
                raise DataError(f"--option {item!r}: {raw!r} is not a finite number")
        out[key.replace("-", "_")] = value
    return out


def _one_line(text: str, width: int) -> str:
    flat = " / ".join(line for line in text.splitlines() if line.strip())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def _cmd_list(args: argparse.Namespace) -> int:
    from splice.data import TASKS, SourceMissingError, load_task

    w = max(len(name) for name in TASKS)
    print(f"{'task':<{w}} {'installed':<9} {'size':>7}  classes")
    for name in TASKS:
        try:
            ds = load_task(name, cache_dir=args.cache_dir)
        except SourceMissingError as e:
            print(f"{name:<{w}} {'no':<9} {'-':>7}  -")
            print(f"{'':<{w}} install: {str(e).rsplit('install it with: ', 1)[-1]}")
            continue
        names = ", ".join(ds.label_names)
        print(f"{name:<{w}} {'yes':<9} {len(ds):>7,}  {ds.num_classes}: {_one_line(names, 60)}")
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    from splice.data import load_task
    from splice.data.splits import order_key
    from splice.numbers import check_number

    check_number(args.examples, "--examples", ge=0, integer=True, error=DataError)
    ds = load_task(args.name, cache_dir=args.cache_dir, **_parse_options(args.option))
    print(f"{ds.source}: {len(ds):,} examples, {ds.num_classes} classes")
    for key, value in ds.info.items():
        print(f"  {key}: {value}")
    print(f"  content hash: {ds.content_hash()}")
    width = max(len(n) for n in ds.label_names)
    for name, count in ds.class_counts().items():
        print(f"  {name:<{width}}  {count:>7,}  {100 * count / len(ds):5.1f}%")
    picks = sorted(range(len(ds)), key=lambda i: order_key(args.seed, i))[: args.examples]
    for i in picks:
        print(f"[{i}] {ds.label_names[ds.labels[i]]}: {_one_line(ds.texts[i], 200)}")
    return 0


def _cmd_split(args: argparse.Namespace) -> int:
    from splice.data import load_task, make_splits

    ds = load_task(args.name, cache_dir=args.cache_dir, **_parse_options(args.option))
    try:
        sizes = [float(x) for x in args.sizes.split(",")]
    except ValueError:
        raise DataError(
            f"--sizes expects three fractions like 0.8,0.1,0.1, got {args.sizes!r}"
        ) from None
    caps = {
        "train": args.max_train_per_class,
        "validation": args.max_eval_per_class,
        "test": args.max_eval_per_class,
    }
    source = Path(args.name)
    if source.is_file() and Path(args.out).resolve() == source.resolve():
        raise DataError(f"--out {args.out} is the data file itself; give another file")
    splits = make_splits(ds, args.seed, sizes, max_per_class=caps)
    path = splits.save(args.out, ds)
    print(
        f"wrote {path}: train {len(splits.train):,}, validation {len(splits.validation):,}, "
        f"test {len(splits.test):,} (seed {args.seed}, data hash {splits.data_hash[:12]})"
    )
    return 0


def _add_cache_dir(q: argparse.ArgumentParser) -> None:
    q.add_argument(
        "--cache-dir",
        default=None,
        help="where downloaded sources live ($SPLICE_DATA or ~/.cache/splice/data)",
    )


def _add_task(q: argparse.ArgumentParser) -> None:
    q.add_argument("name", help="built-in task name, or a .csv/.tsv/.jsonl file")
    q.add_argument(
        "-o",
        "--option",
        action="append",
        metavar="KEY=VALUE",
        help="loader option, e.g. min_confidence=0.6, with_lemmas=true, dedupe=false",
    )
    _add_cache_dir(q)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="labeled text tasks: list, show, split")
    dsub = p.add_subparsers(dest="data_command", required=True)
    lst = dsub.add_parser("list", help="each built-in task: installed?, size, classes")
    _add_cache_dir(lst)
    lst.set_defaults(fn=_cmd_list)

    show = dsub.add_parser("show", help="counts per class and a few examples")
    _add_task(show)
    show.add_argument("--examples", type=int, default=3, help="examples to print (3)")
    show.add_argument("--seed", type=int, default=0, help="which examples (0)")
    show.set_defaults(fn=_cmd_show)

    split = dsub.add_parser("split", help="save a seeded stratified train/validation/test split")
    _add_task(split)
    split.add_argument("--out", required=True, help="split file to write (JSON)")
    split.add_argument("--seed", type=int, default=0, help="seed (0)")
    split.add_argument("--sizes", default="0.8,0.1,0.1", help="fractions (0.8,0.1,0.1)")
    split.add_argument("--max-train-per-class", type=int, default=None, help="cap (none)")
    split.add_argument(
        "--max-eval-per-class", type=int, default=None, help="cap for validation and test (none)"
    )
    split.set_defaults(fn=_cmd_split)
