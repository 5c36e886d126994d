"""`splice inspect PATH [OTHER]`: list a checkpoint's tensors, or compare two."""

from __future__ import annotations

import argparse


def _cmd_inspect(args: argparse.Namespace) -> int:
    from splice.inspect_ckpt import compare, human_bytes, summarize
    from splice.reference import open_checkpoint

    a = open_checkpoint(args.path)
    try:
        if args.other is None:
            s, rows = summarize(a)
            if not args.summary:
                width = max((len(r[0]) for r in rows), default=4)
                for name, shape, dt in rows:
                    print(f"{name:<{width}}  {list(shape)!s:<20} {dt}")
            print(
                f"{s.tensors} tensors, {s.parameters:,} parameters, {human_bytes(s.bytes)}; "
                + ", ".join(f"{k}: {v:,}" for k, v in s.dtypes.items())
            )
            return 0
        b = open_checkpoint(args.other)
        try:
            rows, only_a, only_b = compare(a, b)
        finally:
            b.close()
        width = max((len(r.name) for r in rows), default=4)
        print(f"{'tensor':<{width}}  {'|b-a|':>10} {'|b-a|/|a|':>10} {'cos(a,b)':>9}")
        for r in rows:
            print(f"{r.name:<{width}}  {r.delta_norm:>10.4g} {r.relative:>10.4g} {r.cosine:>9.5f}")
        total = sum(r.delta_norm**2 for r in rows if r.delta_norm == r.delta_norm) ** 0.5
        print(
            f"{len(rows)} shared tensors, total |b-a| = {total:.4g}; "
            f"only in {args.path}: {len(only_a)}, only in {args.other}: {len(only_b)}"
        )
        for n in only_a[:5]:
            print(f"  only in first: {n}")
        for n in only_b[:5]:
            print(f"  only in second: {n}")
        return 0
    finally:
        a.close()


def register(sub: argparse._SubParsersAction) -> None:
    i = sub.add_parser("inspect", help="list a checkpoint's tensors, or compare two")
    i.add_argument("path")
    i.add_argument("other", nargs="?", default=None)
    i.add_argument("--summary", action="store_true", help="totals only")
    i.set_defaults(fn=_cmd_inspect)
