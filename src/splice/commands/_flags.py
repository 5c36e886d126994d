"""Flags shared by several subcommands (the module name starts with ``_``: not a command)."""

from __future__ import annotations

import argparse
from typing import Any


def add_allow_nonfinite(p: argparse.ArgumentParser) -> None:
    """``--allow-nonfinite``: the opt-in of `splice.io.finite`'s NaN / ±inf policy."""
    p.add_argument(
        "--allow-nonfinite",
        action="store_true",
        help="accept input tensors holding NaN / inf and write non-finite output values "
        "(e.g. float16 overflow); by default either is an error naming the tensor",
    )


OVERWRITE_HELP = (
    "replace an existing --out written by splice (it holds splice_output.json and no input of "
    "this run); give it twice to replace any folder"
)


def add_overwrite_argument(p: argparse.ArgumentParser) -> None:
    """`--overwrite`, counted: 1 replaces a previous splice output, 2 any folder."""
    p.add_argument("--overwrite", action="count", default=0, help=OVERWRITE_HELP)


def add_output_flags(
    p: argparse.ArgumentParser, out_help: str = "output folder", *, shard_size: bool = False
) -> None:
    """The flags of a subcommand that writes a folder: ``--out`` (required), ``--overwrite``,
    ``--allow-nonfinite`` and, with ``shard_size``, ``--shard-size``."""
    p.add_argument("--out", required=True, help=out_help)
    if shard_size:
        p.add_argument("--shard-size", default="2GB", help="max bytes per output shard (2GB)")
    add_overwrite_argument(p)
    add_allow_nonfinite(p)


def output_options(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments `add_output_flags`' flags give the writing function:
    ``overwrite``, ``allow_nonfinite`` and ``shard_bytes`` where there is ``--shard-size``."""
    options: dict[str, Any] = {"overwrite": args.overwrite, "allow_nonfinite": args.allow_nonfinite}
    if "shard_size" in args:
        from splice.io import parse_size

        options["shard_bytes"] = parse_size(args.shard_size)
    return options


def add_ray_flag(p: argparse._ActionsContainer, what: str) -> None:
    """``--ray [ADDRESS]``: run ``what`` as Ray tasks (`splice.engine.ray_pool`); alone, the
    value is ``local`` (RAY_ADDRESS if set, else a new local Ray instance)."""
    p.add_argument(
        "--ray",
        nargs="?",
        const="local",
        metavar="ADDRESS",
        help=f"run {what} as Ray tasks: ADDRESS of a running cluster (HOST:6379, "
        "'ray://HOST:10001', 'auto'); alone: RAY_ADDRESS, else a new local instance "
        "(docs/ray.md)",
    )
