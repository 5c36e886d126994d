"""The serving engine's request types: what a client asks for and what it gets back.

A `GenerationRequest` is one prompt (token ids), the adapter that serves it (``None`` for the
base model) and its `SamplingParams`. The engine answers with a stream of `TokenEvent`s on
the request's `RequestHandle`: one per generated token (its id and the text it adds), the
last one carrying ``finish_reason`` ("stop": EOS or a stop string; "length": max_tokens;
"abort": cancelled or the engine stopped; "error": see ``error``).

A handle is read either synchronously (``for event in handle``) or from asyncio
(``async for event in handle``) when the request was submitted with ``loop=``: the engine's
thread hands events to that loop with ``call_soon_threadsafe``, so a waiting HTTP request
costs no thread.
"""

from __future__ import annotations

import asyncio
import math
import queue
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

from splice.errors import SpliceError


class EngineError(SpliceError):
    """A request the engine cannot take (queue full, prompt too long, engine stopped).

    ``reason`` says which kind, for a server's status code: "invalid" (the request itself:
    prompt, sampling parameters), "unknown_adapter" (no such adapter, or one that cannot
    serve a mixed batch), "queue_full" (retry later), "stopped" (the engine is stopped or
    shutting down)."""

    def __init__(self, message: str, reason: str = "invalid") -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling, with OpenAI's names and defaults.

    temperature 0 is greedy (argmax); otherwise logits / temperature, then nucleus filtering
    (the smallest set of tokens whose probability reaches ``top_p``), then a draw from a
    ``torch.Generator`` seeded with ``seed`` (a random seed when None). Generation ends at
    ``max_tokens`` new tokens, at EOS, or when the text contains a ``stop`` string (the
    returned text ends before it)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int):
            raise EngineError(f"max_tokens must be an integer, got {self.max_tokens!r}")
        if self.max_tokens < 1:
            raise EngineError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise EngineError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not math.isfinite(self.top_p) or not 0 < self.top_p <= 1:
            raise EngineError(f"top_p must be in (0, 1], got {self.top_p}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise EngineError("stop strings must be non-empty strings")


@dataclass
class GenerationRequest:
    request_id: str
    prompt_ids: list[int]
    adapter: str | None = None  # None: the base model
    params: SamplingParams = field(default_factory=SamplingParams)


@dataclass(frozen=True)
class TokenEvent:
    request_id: str
    token_id: int | None  # None on a final event that adds no token
    text: str  # the text this event adds to the completion (may be "")
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error" | None
    error: str | None = None
    # On an "error" event relayed from another process (a Ray Serve replica): the HTTP answer
    # the replica's server would have given (status, OpenAI ``code`` and ``param``), so the
    # front end answers the same; None: a failure while generating (HTTP 500).
    error_status: int | None = None
    error_code: str | None = None
    error_param: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class RequestHandle:
    """The event stream of one submitted request (see the module docstring)."""

    def __init__(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop | None = None):
        self.request = request
        self._loop = loop
        self._sync: queue.SimpleQueue[TokenEvent] = queue.SimpleQueue()
        self._async: asyncio.Queue[TokenEvent] | None = asyncio.Queue() if loop else None
        self.cancelled = False

    def push(self, event: TokenEvent) -> None:
        """Called by the engine (any thread)."""
        if self._loop is not None and self._async is not None:
            try:
                self._loop.call_soon_threadsafe(self._async.put_nowait, event)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                self.cancelled = True
        else:
            self._sync.put(event)

    def cancel(self) -> None:
        """Ask the engine to stop this request (it ends with finish_reason "abort")."""
        self.cancelled = True

    def __iter__(self) -> Iterator[TokenEvent]:
        if self._loop is not None:
            raise EngineError("this request was submitted with loop=: read it with async for")
        while True:
            event = self._sync.get()
            yield event
            if event.finished:
                return

    async def __aiter__(self) -> AsyncIterator[TokenEvent]:
        if self._async is None:
            raise EngineError("this request was submitted without loop=: read it with for")
        while True:
            event = await self._async.get()
            yield event
            if event.finished:
                return
