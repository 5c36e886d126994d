"""The Ray Serve ingress's stand-ins for the engine and the adapter cache: the same methods
`splice.serve.app` calls (`submit`, `stats`, `start`, `stop`; `acquire`, `release`, `load`,
`unload`, `loaded`), backed by the replica deployment instead of a local model.

So the ingress runs the unchanged HTTP app (`build_app` over a `ServerState` whose engine is a
`RemoteEngine` and whose cache is a `RemoteAdapterCache`): request parsing, limits, keys,
response and SSE shapes and error bodies are those of `splice serve`.

`RemoteEngine.submit(request, loop)` returns a `RequestHandle` at once (as the engine does)
and starts a task on ``loop`` that calls the replicas' ``generate`` as a streaming call,
``handle.options(stream=True, multiplexed_model_id=ADAPTER)`` (no model id for the base
model), and pushes each `TokenEvent` it receives onto the handle. Ray routes a request with
a model id to a replica that has that adapter loaded when one exists (Serve's model
multiplexing), else to a replica that loads it. Cancelling the handle cancels the remote
call (the replica then cancels its engine request) and ends the handle with "abort"; a
failure of the remote call ends it with "error" (HTTP 500, or an error event in a stream).

`RemoteAdapterCache.acquire` resolves the adapter name with the server's `AdapterSources`
(named adapters and adapter roots; the same path rules as `splice serve`), so an unknown
name is a 404 and a name outside the roots a 400 before any remote call; the replica
resolves it again, with the same rules, when it loads it. Runtime loading
(``/v1/load_lora_adapter``) is refused: replicas load adapters only from the configured
names and roots, each keeping its own LRU.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from splice.serve.adapter_cache import AdapterBusyError, AdapterLoadError
from splice.serve.adapter_sources import AdapterSources
from splice.serve.requests import EngineError, GenerationRequest, RequestHandle, TokenEvent


@dataclass(frozen=True)
class RemoteStats:
    running: int  # requests this ingress has in flight at the replicas
    waiting: int = 0  # queued in the replicas' engines: not seen from the ingress


class RemoteHandle(RequestHandle):
    """A `RequestHandle` whose `cancel` also cancels the task reading the remote stream, and
    that always gets a final event (one `Generation.close` waits for)."""

    task: asyncio.Task | None = None
    ended = False

    def push(self, event: TokenEvent) -> None:
        if self.ended:
            return
        self.ended = event.finished
        super().push(event)

    def end(self, task: asyncio.Task) -> None:
        """The reading task's done callback: "abort" if it ended (cancelled before it ran,
        even) without a final event."""
        if not self.ended:
            self.push(TokenEvent(self.request.request_id, None, "", "abort"))

    def cancel(self) -> None:
        super().cancel()
        if self.task is not None and not self.task.done():
            self.task.get_loop().call_soon_threadsafe(self.task.cancel)


class RemoteEngine:
    """The engine API over a handle to the replica deployment (module docstring)."""

    def __init__(self, replicas: Any) -> None:
        self.replicas = replicas  # a DeploymentHandle to SpliceReplica
        self._inflight: set[asyncio.Task] = set()
        self._stopping = False

    @property
    def stats(self) -> RemoteStats:
        return RemoteStats(running=len(self._inflight))

    def start(self) -> None:
        self._stopping = False

    def stop(self, drain: bool = True, timeout: float | None = None) -> bool:
        """Refuse new requests; with ``drain``, wait (up to ``timeout``) for those in flight.
        Called from a worker thread (the app's shutdown), so it polls."""
        self._stopping = True
        deadline = None if timeout is None else time.monotonic() + timeout
        while drain and self._inflight:
            if deadline is not None and time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return not self._inflight

    def submit(
        self, request: GenerationRequest, loop: asyncio.AbstractEventLoop | None = None
    ) -> RequestHandle:
        if loop is None:
            raise EngineError("the Ray Serve front end streams to asyncio: submit with loop=")
        if self._stopping:
            raise EngineError("the engine is stopped or shutting down: no new requests", "stopped")
        handle = RemoteHandle(request, loop)
        task = loop.create_task(self._pump(handle))
        handle.task = task
        task.add_done_callback(handle.end)
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)
        return handle

    def _call(self, request: GenerationRequest) -> Any:
        call = self.replicas.options(method_name="generate", stream=True)
        if request.adapter is not None:
            call = call.options(multiplexed_model_id=request.adapter)
        return call.remote(request)

    async def _pump(self, handle: RemoteHandle) -> None:
        request = handle.request
        stream = self._call(request)
        finished = False
        try:
            async for event in stream:
                handle.push(event)
                if event.finished:
                    finished = True
                    break
        except asyncio.CancelledError:
            stream.cancel()
            handle.push(TokenEvent(request.request_id, None, "", "abort"))
            return
        except Exception as e:  # the replica died or raised: end this request only
            first_line = (str(e).strip().splitlines() or [type(e).__name__])[-1]
            handle.push(TokenEvent(request.request_id, None, "", "error", f"replica: {first_line}"))
            return
        if not finished:
            error = "replica: the stream ended without a final event"
            handle.push(TokenEvent(request.request_id, None, "", "error", error))


class RemoteAdapterCache:
    """The adapter cache API at the ingress: names resolved here, adapters loaded by the
    replicas (module docstring)."""

    def __init__(self, sources: AdapterSources) -> None:
        self.sources = sources
        self.loaded: dict[str, Any] = {}  # nothing is loaded in the ingress
        self.loads = 0
        self.evictions = 0

    async def acquire(self, name: str) -> None:
        self.sources.resolve(name)  # UnknownAdapterError (404) / AdapterPathError (400)

    def release(self, name: str) -> None:
        pass

    async def load(self, name: str, path: Path) -> bool:
        raise AdapterLoadError(
            "runtime adapter loading is not available under Ray Serve: each replica loads "
            "adapters on first use from the configured adapters and adapter roots; put the "
            "folder in an adapter root instead"
        )

    async def unload(self, name: str) -> None:
        raise AdapterBusyError(
            "under Ray Serve each replica unloads adapters itself (least recently used "
            "beyond max_loaded per replica)"
        )
