"""Flags shared by several subcommands (the module name starts with ``_``: not a command)."""

from __future__ import annotations

import argparse


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
