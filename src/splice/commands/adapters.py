"""`splice adapters`: every adapter method with its parameters and defaults."""

from __future__ import annotations

import argparse


def _run(args: argparse.Namespace) -> int:
    from splice.adapters.reference import adapter_table

    print(adapter_table())
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("adapters", help="list adapter methods with their parameters and defaults")
    p.set_defaults(fn=_run)
