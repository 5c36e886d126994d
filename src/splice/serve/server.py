"""Build a `ServerState` from a `ServeConfig` and run it under uvicorn.

`build_state` checks everything cheap first (the keys file, the adapter roots and named
folders, BASE), then loads the base model and tokenizer (`splice.train.models`, float32, eval
mode) and makes the engine and the adapter cache; adapters load on first use. `run_server`
serves the app until SIGINT / SIGTERM, then shuts down gracefully: uvicorn stops accepting
connections and waits up to ``shutdown_timeout`` seconds for the requests in flight
(streams included), and the app's lifespan drains the engine.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from splice.serve.adapter_cache import AdapterCache
from splice.serve.adapter_sources import AdapterPathError, AdapterSources
from splice.serve.api_keys import ApiKeys
from splice.serve.config import ServeConfig, ServeConfigError
from splice.serve.state import ServeLimits, ServerState


@dataclass
class Checked:
    """What `preflight` checked: the keys, the adapter sources, BASE's folder."""

    keys: ApiKeys | None
    sources: AdapterSources
    base_folder: Path | None


def preflight(config: ServeConfig, *, resolve_base: bool = True) -> Checked:
    """The cheap checks, before any port is bound or model loaded: the keys file, the named
    adapter folders and roots, and BASE (a packaged name or an HF folder)."""
    keys = ApiKeys.load(config.api_keys) if config.api_keys else None
    for name, path in config.adapters.items():
        if not Path(path).is_dir():
            raise AdapterPathError(f"--adapter {name}={path}: no such folder")
    sources = AdapterSources(config.adapters, config.adapter_roots)
    folder = None
    if resolve_base:
        from splice.train.models import resolve_model

        folder = resolve_model(config.base)
    return Checked(keys, sources, folder)


def build_state(
    config: ServeConfig,
    model: Any = None,
    tokenizer: Any = None,
    *,
    checked: Checked | None = None,
) -> ServerState:
    """The state for ``config`` (not started). ``model`` / ``tokenizer`` skip loading BASE
    (tests, or a host that loaded them already); ``checked``: `preflight`'s result."""
    given = model is not None and tokenizer is not None
    checked = checked or preflight(config, resolve_base=not given)
    keys, sources = checked.keys, checked.sources
    if not given:
        from splice.train.models import load_for_task

        model, tokenizer, _ = load_for_task(str(checked.base_folder), "causal_lm")
    from splice.adapters import AdapterModel
    from splice.serve.engine import BatchingEngine

    am = model if isinstance(model, AdapterModel) else AdapterModel(model.eval())
    am.eval()
    context = getattr(getattr(am.model, "config", None), "max_position_embeddings", None)
    max_prompt = config.max_prompt_tokens
    engine = BatchingEngine(
        am,
        tokenizer,
        max_batch=config.max_batch,
        max_queue=config.max_queue,
        max_prompt_tokens=max_prompt,
    )
    cache = AdapterCache(
        am,
        sources,
        engine.run_between_steps,
        max_loaded=config.max_loaded,
        max_bytes=config.loaded_bytes_budget,
    )
    limits = ServeLimits(
        max_tokens=config.max_tokens,
        max_prompt_tokens=max_prompt,
        max_prompts=config.max_batch,
        context_length=context if isinstance(context, int) else None,
    )
    engine.compositions = config.composition_sets()
    return ServerState(
        engine=engine,
        tokenizer=tokenizer,
        cache=cache,
        base_id=config.base_id(),
        keys=keys,
        limits=limits,
        compositions=engine.compositions,
    )


def uvicorn_server(state: ServerState, config: ServeConfig, **options: Any) -> Any:
    """A `uvicorn.Server` for ``state``'s app (not running)."""
    import uvicorn

    from splice.serve.app import build_app

    settings = uvicorn.Config(
        build_app(state),
        host=config.host,
        port=config.port,
        timeout_graceful_shutdown=config.shutdown_timeout,
        log_level=options.pop("log_level", "info"),
        access_log=options.pop("access_log", False),
        **options,
    )
    return uvicorn.Server(settings)


def bound_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: a free one), for uvicorn's
    ``sockets=``; binding first gives a clear error and the real port before serving."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ServeConfigError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock
