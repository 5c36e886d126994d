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
