"""What one served app holds: the engine, the tokenizer, the adapter cache, the keys, the
metrics and the limits. `splice.serve.app.build_app` makes the HTTP app from it, so another
front end (Ray Serve) builds one state per replica and reuses the same app.

Lifecycle: `start` starts the decode thread and hooks the gauges to it (idempotent); `stop`
refuses new requests and, with ``drain``, lets the running and queued ones finish.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from splice.serve.adapter_cache import AdapterCache
from splice.serve.adapter_sources import AdapterSources
from splice.serve.api_keys import ApiKeys
from splice.serve.metrics import ServeMetrics


@dataclass
class ServeLimits:
    """Per-request limits (HTTP 400 beyond them)."""

    max_tokens: int = 1024  # the largest max_tokens a request may ask for
    max_prompt_tokens: int | None = None  # None: the model's context length
    max_prompts: int = 16  # prompts in one /v1/completions request
    context_length: int | None = None  # the model's max_position_embeddings


@dataclass
class ServerState:
    engine: Any  # splice.serve.engine.BatchingEngine (or a test double with its API)
    tokenizer: Any
    cache: AdapterCache
    base_id: str
    keys: ApiKeys | None = None
    limits: ServeLimits = field(default_factory=ServeLimits)
    metrics: ServeMetrics = field(default_factory=ServeMetrics)
    created: int = field(default_factory=lambda: int(time.time()))
    # named compositions (served model ids): name -> the weighted set of adapters they run
    compositions: dict[str, tuple[tuple[str, float], ...]] = field(default_factory=dict)
    started: bool = False

    @property
    def sources(self) -> AdapterSources:
        return self.cache.sources

    def adapters_of(self, model: str | None) -> tuple[str, ...]:
        """The adapters a request for ``model`` uses (none for the base)."""
        if model is None:
            return ()
        weights = self.compositions.get(model)
        return (model,) if weights is None else tuple(a for a, _ in weights)

    def start(self) -> None:
        if self.started:
            return
        self.engine.start()
        self.metrics.watch(
            running=lambda: self.engine.stats.running,
            waiting=lambda: self.engine.stats.waiting,
            loaded=lambda: len(self.cache.loaded),
            loads=lambda: self.cache.loads,
            evictions=lambda: self.cache.evictions,
        )
        self.started = True

    def stop(self, drain: bool = True, timeout: float | None = None) -> bool:
        """Stop the engine (``drain``: finish what was accepted); whether it ended in time."""
        return bool(self.engine.stop(drain=drain, timeout=timeout))
