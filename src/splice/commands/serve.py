"""`splice serve`: an OpenAI-compatible server for a base model and its adapters;
`splice serve-key`: a new API key and its keys-file entry."""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _flags(args: argparse.Namespace) -> dict[str, Any]:
    from splice.serve.config import parse_adapter_flags

    return {
        "base": args.base,
        "adapters": parse_adapter_flags(args.adapter) if args.adapter else None,
        "adapter_roots": args.adapter_root,
        "host": args.host,
        "port": args.port,
        "api_keys": args.api_keys,
        "max_batch": args.max_batch,
        "max_queue": args.max_queue,
        "max_loaded": args.max_loaded,
        "max_loaded_bytes": args.max_loaded_bytes,
        "max_prompt_tokens": args.max_prompt_tokens,
        "max_tokens": args.max_tokens,
        "served_name": args.served_name,
    }


def _run(args: argparse.Namespace) -> int:
    from splice.serve.config import load_serve_config
    from splice.serve.server import bound_socket, build_state, preflight, uvicorn_server

    config = load_serve_config(args.config, _flags(args))
    if args.ray is not None:
        from splice.commands._serve_ray import run_ray

        return run_ray(args, config)
    checked = preflight(config)
    sock = bound_socket(config.host, config.port)  # a port in use fails before loading
    try:
        state = build_state(config, checked=checked)
    except BaseException:
        sock.close()
        raise
    host, port = sock.getsockname()[:2]
    if state.keys is None and config.host not in LOOPBACK:
        print(
            f"splice serve: warning: listening on {config.host} without --api-keys: anyone "
            "who can reach this port can use the server",
            file=sys.stderr,
        )
    names = state.sources.available()
    print(
        f"splice serve: {state.base_id} with {len(names)} adapter(s) at http://{host}:{port}/v1",
        flush=True,
    )
    server = uvicorn_server(state, config, log_level="warning")
    try:
        with _quiet_stop_signals():
            server.run(sockets=[sock])
    finally:
        sock.close()
    print("splice serve: stopped", flush=True)
    return 0


@contextlib.contextmanager
def _quiet_stop_signals() -> Iterator[None]:
    """SIGINT / SIGTERM stop the server gracefully (uvicorn's handlers); uvicorn then raises
    the signal again for the handlers it found, so these make that a clean exit (0)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    stops = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.signal(s, lambda *_: None) for s in stops}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _key(args: argparse.Namespace) -> int:
    from splice.serve.api_keys import hash_key, new_key

    key = sys.stdin.readline().rstrip("\r\n") if args.stdin else new_key()
    if not key:
        from splice.serve.api_keys import ApiKeysError

        raise ApiKeysError("no key on standard input")
    if not args.stdin:
        print(f"key (give it to the client; it is not stored): {key}")
    print("keys-file entry:")
    print(f"  - name: {args.name}")
    print(f"    sha256: {hash_key(key)}")
    print('    adapters: "*"')
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a base model and its adapters over an OpenAI-compatible HTTP API",
        description="Serve BASE and its adapters over HTTP (/v1/completions, "
        "/v1/chat/completions, /v1/models, /v1/load_lora_adapter, /health, /metrics). "
        "See docs/serving.md.",
    )
    p.add_argument("base", nargs="?", help="an HF model folder or a packaged name (smollm2)")
    p.add_argument("--config", help="a YAML file with the same keys as the flags; flags win")
    p.add_argument(
        "--adapter",
        action="append",
        metavar="NAME=PATH",
        help="serve the adapter folder PATH as NAME",
    )
    p.add_argument(
        "--adapter-root",
        action="append",
        metavar="DIR",
        help="serve every adapter folder DIR/NAME as NAME (and allow runtime loads from DIR)",
    )
    p.add_argument("--host", help="address to listen on (127.0.0.1)")
    p.add_argument("--port", type=int, help="port (8000; 0: a free one)")
    p.add_argument("--api-keys", metavar="FILE", help="keys file (see splice serve-key)")
    p.add_argument("--max-batch", type=int, help="sequences decoded together (16)")
    p.add_argument("--max-queue", type=int, help="requests waiting for a batch slot (256)")
    p.add_argument("--max-loaded", type=int, help="adapters held in memory at once (8)")
    p.add_argument("--max-loaded-bytes", help="bytes of adapter tensors held (e.g. 2GB)")
    p.add_argument("--max-prompt-tokens", type=int, help="longest prompt (the model's context)")
    p.add_argument("--max-tokens", type=int, help="largest max_tokens of a request (1024)")
    p.add_argument("--served-name", help="the base model's id in the API (BASE's name)")
    from splice.commands._serve_ray import add_ray_flags

    add_ray_flags(p)
    p.set_defaults(fn=_run)

    k = sub.add_parser(
        "serve-key",
        help="make an API key for splice serve and print its keys-file entry (a hash)",
    )
    k.add_argument("--name", default="client", help="the key's name in the keys file")
    k.add_argument(
        "--stdin", action="store_true", help="hash the key read from standard input instead"
    )
    k.set_defaults(fn=_key)
