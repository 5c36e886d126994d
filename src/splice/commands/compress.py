"""``splice compress METHOD`` and ``splice restore``: store N fine-tuned checkpoints as
one shared task vector plus bit-packed per-task masks, and rebuild any task's model.

The methods and their flags come from the compression registry (`splice.compress.registry`):
one flag per parameter (``--lambda`` for TALL's ``lambda_``; a per-model parameter takes one
value or one per model). The method's parser is built when the command runs, so that
``splice --help`` does not import torch; ``splice compress --list`` lists the methods.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from splice.commands._flags import add_output_flags, output_options

if TYPE_CHECKING:
    from splice.compress.registry import CompressionMethod


def method_parser(method: CompressionMethod) -> argparse.ArgumentParser:
    """The flags of ``splice compress METHOD``: the inputs, the output flags, and one flag
    per parameter of the method (its default applies when the flag is not given)."""
    from splice.compress.registry import param_help

    p = argparse.ArgumentParser(prog=f"splice compress {method.name}", description=method.summary)
    p.add_argument("--base", required=True, help="the pre-trained checkpoint")
    p.add_argument("--models", nargs="+", required=True, help="fine-tuned checkpoints (>= 2)")
    p.add_argument("--names", nargs="+", default=None, help="task names (default: file stems)")
    add_output_flags(p, shard_size=True)
    for spec in method.params:
        p.add_argument(
            f"--{spec.name.replace('_', '-')}",
            dest=spec.arg,
            nargs="+" if spec.per_model else None,
            default=None,
            metavar=spec.name.upper(),
            help=f"{param_help(spec)} ({spec.default!r})",
        )
    return p


def _cmd_compress(args: argparse.Namespace) -> int:
    from splice.commands.methods import compression_section
    from splice.compress import compress, get_compression_method

    if args.list or args.method is None:
        print(compression_section())
        return 0
    method = get_compression_method(args.method, "checkpoints")  # unknown: "did you mean"
    opts = method_parser(method).parse_args(args.flags)
    params = {}
    for spec in method.params:
        value = getattr(opts, spec.arg)
        if value is not None:  # one value of a per-model parameter applies to every model
            params[spec.name] = value[0] if spec.per_model and len(value) == 1 else value
    report = compress(
        method.name,
        opts.base,
        opts.models,
        opts.out,
        params=params,
        names=opts.names,
        **output_options(opts),
    )
    print(
        f"compressed {len(opts.models)} models ({report.tensors} tensors) with '{method.name}' "
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
    c = sub.add_parser(
        "compress",
        help="store fine-tuned models as one vector + task masks",
        description="Compress N fine-tunes of one base. `splice compress --list` lists the "
        "methods and their parameters; `splice compress METHOD --help` shows a method's flags.",
    )
    c.add_argument("--list", action="store_true", help="list the compression methods")
    c.add_argument("method", nargs="?", metavar="METHOD", help="a compression method (see --list)")
    c.add_argument("flags", nargs=argparse.REMAINDER, help="the method's flags (METHOD --help)")
    c.set_defaults(fn=_cmd_compress)

    r = sub.add_parser("restore", help="rebuild one task's model from a compressed folder")
    r.add_argument("folder", help="a folder written by 'splice compress'")
    r.add_argument("--task", required=True, help="task name or 0-based index")
    r.add_argument("--base", default=None, help="the base checkpoint (default: as recorded)")
    add_output_flags(r, shard_size=True)
    r.set_defaults(fn=_cmd_restore)
