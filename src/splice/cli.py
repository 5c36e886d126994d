"""The `splice` command line. Thin: parse flags, call the library, print.

Exit code 0 on success, 1 on a SpliceError or another expected failure such as an OS error
(one line on stderr, ``splice: error: ...``; the traceback only with --debug), 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Sequence

from splice import __version__
from splice.errors import SpliceError, expected_failure


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="splice", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"splice {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = p.add_subparsers(dest="command", required=True)

    from splice.commands import register_all

    register_all(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command. A `SpliceError` prints ``splice: error: MSG`` and exits 1; so does
    an expected failure that is not one (an OS error, undecodable text, a YAML / JSON
    syntax error, too-deep nesting, an invalid regular expression, a CSV error, a pydantic
    validation error; see `splice.errors.expected_failure`). Anything else is a bug and
    keeps its traceback. Ctrl-C exits 130. ``--debug`` prints the traceback of every error.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if getattr(args, "threads", None) is not None and args.threads < 1:
            raise SpliceError("--threads must be at least 1")
        return int(args.fn(args))
    except SpliceError as e:
        if args.debug:
            traceback.print_exc()
        print(f"splice: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("splice: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        message = expected_failure(e)
        if message is None:
            raise
        if args.debug:
            traceback.print_exc()
        print(f"splice: error: {' '.join(message.split())}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
