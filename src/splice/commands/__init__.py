"""Extra `splice` subcommands, one module each.

Every public module here defines ``register(sub)``: it adds its subparser to ``sub`` (the
result of ``add_subparsers``) and sets ``fn`` (a function of the parsed args returning the
exit code) with ``set_defaults(fn=...)``. Keep heavy imports inside ``fn``, so that
``splice --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil

OVERWRITE_HELP = (
    "replace an existing --out written by splice (it holds splice_output.json and no input of "
    "this run); give it twice to replace any folder"
)


def add_overwrite_argument(p: argparse.ArgumentParser) -> None:
    """`--overwrite`, counted: 1 replaces a previous splice output, 2 any folder."""
    p.add_argument("--overwrite", action="count", default=0, help=OVERWRITE_HELP)


def register_all(sub: argparse._SubParsersAction) -> None:
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}").register(sub)
