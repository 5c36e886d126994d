"""`splice serve --ray [ADDRESS]`: the flags that run `splice serve` on Ray Serve
(`splice.serve.ray_app.run_on_ray`) instead of one local process.

`commands/serve.py` calls `add_ray_flags` on its parser and, once it has the
`ServeConfig`, ``if args.ray is not None: return run_ray(args, config)`` before binding its
own socket.
"""

from __future__ import annotations

import argparse
from typing import Any

LOCAL = "local"  # `--ray` alone: RAY_ADDRESS if set, else a new local Ray instance


def add_ray_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--ray",
        nargs="?",
        const=LOCAL,
        metavar="ADDRESS",
        help="serve on Ray Serve: ADDRESS of a running cluster ('auto', 'ray://HOST:10001'); "
        "alone: RAY_ADDRESS, else a new local instance (see docs/ray.md)",
    )
    p.add_argument("--replicas", type=int, help="with --ray: replicas of the base model (1)")
    p.add_argument("--replica-cpus", type=float, help="with --ray: CPUs per replica (1)")


def _ray_app() -> Any:
    """`splice.serve.ray_app`, or a one-line error when Ray Serve is not installed."""
    import importlib.util

    from splice.serve.config import ServeConfigError

    if importlib.util.find_spec("ray") is None or importlib.util.find_spec("ray.serve") is None:
        raise ServeConfigError("--ray needs Ray Serve: pip install 'splice[ray]'")
    import splice.serve.ray_app as ray_app

    return ray_app


def ray_options(args: argparse.Namespace) -> Any:
    """The `RayOptions` the flags give (strict: replicas >= 1, CPUs >= 0)."""
    from splice.config_errors import parse_config
    from splice.serve.config import ServeConfigError

    options_cls = _ray_app().RayOptions

    given = {"replicas": args.replicas, "replica_cpus": args.replica_cpus}
    values = {k: v for k, v in given.items() if v is not None}
    return parse_config(options_cls, values, "flags", ServeConfigError, list_valid=False)


def run_ray(args: argparse.Namespace, config: Any) -> int:
    options = ray_options(args)
    return _ray_app().run_on_ray(config, options, None if args.ray == LOCAL else args.ray)
