"""``splice compress tall|emr`` and ``splice restore``: store N fine-tuned checkpoints as
one shared task vector plus bit-packed per-task masks, and rebuild any task's model."""

from __future__ import annotations

import argparse

from splice.commands._flags import add_output_flags, output_options


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", required=True, help="the pre-trained checkpoint")
    p.add_argument("--models", nargs="+", required=True, help="fine-tuned checkpoints (>= 2)")
    p.add_argument("--names", nargs="+", default=None, help="task names (default: file stems)")
    add_output_flags(p, shard_size=True)


def _cmd_compress(args: argparse.Namespace) -> int:
    from splice.compress import compress_emr, compress_tall

    common = dict(names=args.names, **output_options(args))
    if args.method == "tall":
        lam = args.lambda_[0] if len(args.lambda_) == 1 else args.lambda_
        report = compress_tall(args.base, args.models, args.out, lambdas=lam, **common)
    else:
        report = compress_emr(args.base, args.models, args.out, **common)
    print(
        f"compressed {len(args.models)} models ({report.tensors} tensors) with '{args.method}' "
        f"into {report.out_dir} in {report.seconds:.1f} s: wrote {report.bytes_written / 1e6:.1f}"
        f" MB for {report.bytes_in / 1e6:.1f} MB of fine-tuned weights "
        f"({report.bytes_written / max(report.bytes_in, 1):.1%})"
    )
    return 0


def _cmd_restore(args: argparse.Namespace) -> int:
    from splice.compress import restore

    out = restore(args.folder, args.task, args.out, base_ref=args.base, **output_options(args))
    print(f"restored task '{args.task}' into {out}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser("compress", help="store fine-tuned models as one vector + task masks")
    methods = c.add_subparsers(dest="method", required=True, metavar="METHOD")
    tall = methods.add_parser("tall", help="TALL masks over the task-arithmetic vector")
    _common(tall)
    tall.add_argument(
        "--lambda",
        dest="lambda_",
        type=float,
        nargs="+",
        default=[0.4],
        help="TALL mask lambda: one value, or one per model (0.4)",
    )
    emr = methods.add_parser("emr", help="EMR-Merging: unified vector, masks and rescalers")
    _common(emr)
    c.set_defaults(fn=_cmd_compress)

    r = sub.add_parser("restore", help="rebuild one task's model from a compressed folder")
    r.add_argument("folder", help="a folder written by 'splice compress'")
    r.add_argument("--task", required=True, help="task name or 0-based index")
    r.add_argument("--base", default=None, help="the base checkpoint (default: as recorded)")
    add_output_flags(r, shard_size=True)
    r.set_defaults(fn=_cmd_restore)
