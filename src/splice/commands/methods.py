"""`splice methods`: every merge method with its parameters and defaults."""

from __future__ import annotations

import argparse


def _cmd_methods(args: argparse.Namespace) -> int:
    from splice.merge.reference import method_summaries, method_table

    print(method_summaries())
    print()
    print(method_table())
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    r = sub.add_parser("methods", help="list merge methods with their parameters and defaults")
    r.set_defaults(fn=_cmd_methods)
