"""One HTTP request's trip through the engine: hold the adapter, submit each prompt, merge
the token streams, record the metrics, and clean up however the request ends.

A remote engine (the Ray Serve ingress's) accepts every request at once and refuses it later,
with a final "error" event carrying the HTTP status (`error_event`); its handles have
``first_event``, which `start` awaits, so such a refusal is an `ApiError` from `start` (a 4xx
before any response byte, streams included), as when a local engine refuses in ``submit``.

The adapter (each adapter of a named composition) is held (`AdapterCache.acquire`) once per
prompt from before submission until that prompt's final event, so the cache never evicts
an adapter a queued or running sequence uses. When the client goes away early (a closed
stream, a cancelled task), the unfinished sequences are cancelled and a background task
waits for their final "abort" events before releasing the adapter: the engine may still hold
them for one more step.

Metrics: time to first token is measured from the request's arrival (before tokenizing)
to its first token event; time per output token is the gap between consecutive token
events of one sequence.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from splice.serve.adapter_cache import (
    AdapterCacheFullError,
    AdapterLoadError,
)
from splice.serve.adapter_sources import AdapterPathError, UnknownAdapterError
from splice.serve.api_errors import ApiError
from splice.serve.requests import (
    EngineError,
    GenerationRequest,
    RequestHandle,
    SamplingParams,
    TokenEvent,
)
from splice.serve.state import ServerState


def engine_error(e: EngineError) -> ApiError:
    """The HTTP answer to a request the engine refused, by ``e.reason``: 429 queue full,
    503 stopping, else 400 (a bad prompt, or an adapter the engine cannot batch)."""
    reason, message = getattr(e, "reason", "invalid"), str(e)
    if reason == "queue_full":
        return ApiError(429, message, code="queue_full")
    if reason == "stopped":
        return ApiError(503, message, code="server_shutting_down")
    if reason == "unknown_adapter":
        return ApiError(400, message, code="invalid_adapter", param="model")
    return ApiError(400, message)


def adapter_error(e: Exception, model: str) -> ApiError:
    if isinstance(e, EngineError):
        return engine_error(e)
    if isinstance(e, UnknownAdapterError):
        return ApiError(
            404, f"The model '{model}' does not exist", code="model_not_found", param="model"
        )
    if isinstance(e, AdapterCacheFullError):
        return ApiError(503, str(e), code="adapter_cache_full")
    if isinstance(e, AdapterPathError | AdapterLoadError):
        return ApiError(400, str(e), code="invalid_adapter", param="model")
    raise e


def error_event(request_id: str, e: ApiError) -> TokenEvent:
    """A final "error" event carrying ``e``'s HTTP answer (a replica's refusal, relayed)."""
    return TokenEvent(request_id, None, "", "error", e.message, e.status, e.code, e.param)


def event_error(event: TokenEvent) -> ApiError:
    """The HTTP answer to a final "error" event: the refusal it carries (`error_event`), else
    500 "generation failed" (the model or engine failed mid-generation)."""
    if event.error_status is not None:
        return ApiError(
            event.error_status, event.error or "", code=event.error_code, param=event.error_param
        )
    return ApiError(500, f"generation failed: {event.error}")


_BACKGROUND: set[asyncio.Future[None]] = set()


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def body(self) -> dict[str, int]:
        total = self.prompt_tokens + self.completion_tokens
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": total,
        }


@dataclass
class Generation:
    """Run ``prompts`` (token ids) with ``adapter`` (None: the base) and ``params``; always
    `close` it (in a ``finally``)."""

    state: ServerState
    model: str
    adapter: str | None
    prompts: list[list[int]]
    params: SamplingParams
    arrival: float = field(default_factory=time.perf_counter)
    usage: Usage = field(default_factory=Usage)
    handles: list[RequestHandle] = field(default_factory=list)
    _ended: set[int] = field(default_factory=set)  # sequences the engine has let go
    _unsubmitted_holds: int = 0
    _pumps: list[asyncio.Future[None]] = field(default_factory=list)
    _queue: asyncio.Queue[tuple[int, TokenEvent]] = field(default_factory=asyncio.Queue)
    _closed: bool = False

    async def start(self) -> None:
        """Hold the adapter and submit every prompt; an `ApiError` when refused (the caller's
        `close` then cancels what was submitted)."""
        loop = asyncio.get_running_loop()
        request_id = uuid.uuid4().hex
        for index, ids in enumerate(self.prompts):
            held: list[str] = []
            for name in self.state.adapters_of(self.adapter):
                try:
                    await self.state.cache.acquire(name)
                except Exception as e:
                    for done in held:
                        self.state.cache.release(done)
                    raise adapter_error(e, name if name != self.adapter else self.model) from None
                held.append(name)
            if self.adapter is not None:
                self._unsubmitted_holds += 1
            request = GenerationRequest(f"{request_id}-{index}", ids, self.adapter, self.params)
            try:
                handle = self.state.engine.submit(request, loop=loop)
            except EngineError as e:
                raise engine_error(e) from None
            if self.adapter is not None:
                self._unsubmitted_holds -= 1
            self.handles.append(handle)
            self._pumps.append(asyncio.ensure_future(self._pump(index, handle)))
            first_event = getattr(handle, "first_event", None)
            if first_event is not None:  # a remote engine refuses through its first event
                event = await first_event()
                if event.finish_reason == "error" and event.error_status is not None:
                    raise event_error(event)
        self.usage.prompt_tokens = sum(len(p) for p in self.prompts)
        self.state.metrics.prompt_tokens.inc(self.usage.prompt_tokens)

    async def _pump(self, index: int, handle: RequestHandle) -> None:
        async for event in handle:
            if event.finished:
                self._ended.add(index)
                self._release()
            self._queue.put_nowait((index, event))

    def _release(self) -> None:
        for name in self.state.adapters_of(self.adapter):
            self.state.cache.release(name)

    async def events(self) -> AsyncIterator[tuple[int, TokenEvent]]:
        """(prompt index, event) as they come, every sequence's to its final event."""
        last: dict[int, float] = {}
        finished = 0
        while finished < len(self.handles):
            index, event = await self._queue.get()
            if event.token_id is not None:
                now = time.perf_counter()
                if index in last:
                    self.state.metrics.time_per_output_token.observe(now - last[index])
                else:
                    self.state.metrics.time_to_first_token.observe(now - self.arrival)
                last[index] = now
                self.usage.completion_tokens += 1
                self.state.metrics.generation_tokens.inc()
            finished += event.finished
            yield index, event

    async def close(self) -> None:
        """Cancel the unfinished sequences; release the adapter once the engine let go
        (idempotent)."""
        if self._closed:
            return
        self._closed = True
        for pump in self._pumps:
            pump.cancel()
        for _ in range(self._unsubmitted_holds):
            self._release()
        self._unsubmitted_holds = 0
        for index, handle in enumerate(self.handles):
            if index not in self._ended:
                handle.cancel()
                task = asyncio.ensure_future(self._release_after(index, handle))
                _BACKGROUND.add(task)  # a reference until it ends (asyncio keeps weak ones)
                task.add_done_callback(_BACKGROUND.discard)

    async def _release_after(self, index: int, handle: RequestHandle) -> None:
        await asyncio.sleep(0)  # let the cancelled pump leave the handle first
        if index in self._ended:
            return
        async for event in handle:
            if event.finished:
                break
        self._ended.add(index)
        self._release()
