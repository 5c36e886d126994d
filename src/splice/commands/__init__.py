"""The `splice` subcommands, one module each (`splice.cli` only parses and dispatches).

Every public module here defines ``register(sub)``: it adds its subparser to ``sub`` (the
result of ``add_subparsers``) and sets ``fn`` (a function of the parsed args returning the
exit code) with ``set_defaults(fn=...)``. Keep heavy imports inside ``fn``, so that
``splice --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil


def register_all(sub: argparse._SubParsersAction) -> None:
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}").register(sub)
