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
A request the replica refuses (a prompt its engine rejects, an adapter folder that does not
load, a full queue) ends with an "error" event carrying the HTTP status, code and param the
replica's own server would answer (`splice.serve.generation.error_event`); the handle's
``first_event`` lets `Generation.start` raise it as that `ApiError` before any byte is sent,
so the client sees the status and OpenAI error body of `splice serve`.

`RemoteAdapterCache.acquire` resolves the adapter name with the server's `AdapterSources`
(named adapters and adapter roots; the same path rules as `splice serve`), so an unknown
name is a 404 and a name outside the roots a 400 before any remote call; the replica
resolves it again, with the same rules, when it loads it. It also counts the requests in
flight per adapter (a single ingress sees them all), for the 409 of an unload.

Runtime loading (``/v1/load_lora_adapter``, ``/v1/unload_lora_adapter``): the app validates
``lora_path`` against the adapter roots as `splice serve` does, then `RemoteAdapterCache`
records the change in an `AdapterRegistry` (name -> folder, or a tombstone, with a version
bumped on every change) and has one replica load the adapter at once (the load's errors,
e.g. a malformed folder, are the answer's 400). Every call to a replica carries a snapshot of
the registry; a replica applies the entries whose version it has not seen before serving:
it registers the folder in its own `AdapterSources` (so it can load the adapter on demand,
through ``serve.multiplexed``) and drops its loaded copy of a replaced or unloaded adapter
(when no request of its own still uses it; else on a later call). So the registration
reaches every replica before the first request that could use it, with no broadcast.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from splice.serve.adapter_cache import AdapterBusyError, AdapterLoadError
from splice.serve.adapter_sources import AdapterPathError, AdapterSources
from splice.serve.requests import EngineError, GenerationRequest, RequestHandle, TokenEvent


@dataclass(frozen=True)
class RemoteStats:
    running: int  # requests this ingress has in flight at the replicas
    waiting: int = 0  # queued in the replicas' engines: not seen from the ingress


Registration = tuple[str | None, int]  # (adapter folder, or None: removed; version)


class AdapterRegistry:
    """The ingress's runtime adapter registrations, as sent to the replicas: name ->
    (folder or None, version). A removal leaves a tombstone (None) so replicas that loaded
    the adapter drop it; every change takes a new version, from one counter."""

    def __init__(self) -> None:
        self.entries: dict[str, Registration] = {}
        self._counter = 0

    def set(self, name: str, folder: str | None) -> int:
        self._counter += 1
        self.entries[name] = (folder, self._counter)
        return self._counter

    def live(self, name: str) -> bool:
        return self.entries.get(name, (None, 0))[0] is not None

    def snapshot(self) -> dict[str, Registration]:
        return dict(self.entries)


class RemoteHandle(RequestHandle):
    """A `RequestHandle` whose `cancel` also cancels the task reading the remote stream, and
    that always gets a final event (one `Generation.close` waits for). ``first_event``: the
    first event it received (awaited by `Generation.start`)."""

    task: asyncio.Task | None = None
    ended = False
    first: asyncio.Future[TokenEvent] | None = None

    def push(self, event: TokenEvent) -> None:
        if self.ended:
            return
        self.ended = event.finished
        if self.first is not None and not self.first.done():
            self.first.set_result(event)
        super().push(event)

    async def first_event(self) -> TokenEvent:
        assert self.first is not None
        return await asyncio.shield(self.first)

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

    def __init__(self, replicas: Any, registry: AdapterRegistry | None = None) -> None:
        self.replicas = replicas  # a DeploymentHandle to SpliceReplica
        self.registry = registry if registry is not None else AdapterRegistry()
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
        handle.first = loop.create_future()
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
        return call.remote(request, self.registry.snapshot())

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
    replicas, runtime registrations recorded in ``engine.registry`` (module docstring)."""

    def __init__(self, sources: AdapterSources, engine: RemoteEngine) -> None:
        self.sources = sources
        self.engine = engine
        self.registry = engine.registry
        self.loaded: dict[str, Any] = {}  # nothing is loaded in the ingress
        self.holds: dict[str, int] = {}  # requests in flight per adapter
        self.loads = 0
        self.evictions = 0

    async def acquire(self, name: str) -> None:
        self.sources.resolve(name)  # UnknownAdapterError (404) / AdapterPathError (400)
        self.holds[name] = self.holds.get(name, 0) + 1

    def release(self, name: str) -> None:
        left = self.holds.get(name, 0) - 1
        if left > 0:
            self.holds[name] = left
        else:
            self.holds.pop(name, None)

    async def load(self, name: str, path: Path) -> bool:
        """Register ``name`` -> ``path`` (already checked against the roots) and have one
        replica load it; on failure the registration is withdrawn and the replica's answer
        raised (an `ApiError`: 400 for a malformed folder)."""
        from splice.serve.generation import event_error

        if self.registry.live(name):
            raise AdapterLoadError(f"the adapter '{name}' is already loaded; unload it first")
        previous = self.registry.entries.get(name, (None, 0))[0]
        self.registry.set(name, str(path))
        call = self.engine.replicas.options(method_name="load_runtime", multiplexed_model_id=name)
        try:
            refused = await call.remote(name, self.registry.snapshot())
        except Exception as e:
            self.registry.set(name, previous)
            first_line = (str(e).strip().splitlines() or [type(e).__name__])[-1]
            raise AdapterLoadError(f"adapter '{name}': replica: {first_line}") from None
        if refused is not None:
            self.registry.set(name, previous)
            raise event_error(refused)
        self.loads += 1
        return True

    async def unload(self, name: str) -> None:
        """Withdraw ``name`` (a runtime registration, or the loaded copies of a configured
        adapter): replicas drop their copies when they next see the registry. 409 while this
        ingress has requests for it in flight; KeyError (404) for a name nothing provides."""
        if self.holds.get(name):
            raise AdapterBusyError(
                f"the adapter '{name}' is in use by {self.holds[name]} request(s); retry later"
            )
        if not self.registry.live(name):
            try:
                self.sources.resolve(name)
            except AdapterPathError:
                raise KeyError(name) from None
        self.registry.set(name, None)
        self.evictions += 1
