"""The served adapters held in memory: loaded on first use, least recently used evicted.

An adapter is loaded in two halves. `read_adapter` (file reads, config validation) and
`build_adapter` (its modules built against the model, which is only read, and its tensors
loaded into them) run in a worker thread, so the decode loop keeps stepping meanwhile;
``AdapterModel.attach_adapter`` (hooking the built modules into the model: no compute) and
the deletion of evicted adapters run on the decode thread between two steps
(``engine.run_between_steps``), never during a forward pass.

Limits: at most ``max_loaded`` adapters and ``max_bytes`` bytes of adapter tensors. Before a
new adapter is attached, the least recently used adapters that no request holds are evicted
until it fits; an adapter a request holds (`acquire` ... `release`, from before the request
is queued until its last token) is never evicted. When the held adapters alone leave no room
the load fails with `AdapterCacheFullError` (HTTP 503: retry later). Loads and reservations
in flight count against the limits, so concurrent loads cannot overshoot them.

Every method runs on the server's asyncio loop (one thread); concurrent requests for an
adapter being loaded wait for the one load.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from splice.adapters import AdapterModel
from splice.adapters.peft_format import build_adapter, read_adapter
from splice.errors import SpliceError, expected_failure
from splice.serve.adapter_sources import AdapterSources

RunBetweenSteps = Callable[[Callable[[], Any]], "concurrent.futures.Future[Any]"]


class AdapterLoadError(SpliceError):
    """An adapter folder that cannot be served (malformed, wrong model): HTTP 400."""


class AdapterCacheFullError(SpliceError):
    """No room: the loaded adapters are all in use (HTTP 503)."""


class AdapterBusyError(SpliceError):
    """An unload of an adapter that requests are using, or that is loading (HTTP 409)."""


@dataclass
class LoadedAdapter:
    name: str
    path: Path
    nbytes: int
    users: int = 0


class AdapterCache:
    def __init__(
        self,
        am: AdapterModel,
        sources: AdapterSources,
        run_between_steps: RunBetweenSteps,
        *,
        max_loaded: int = 8,
        max_bytes: int | None = None,
        executor: concurrent.futures.Executor | None = None,
    ) -> None:
        self.am = am
        self.sources = sources
        self.run_between_steps = run_between_steps
        self.max_loaded = max_loaded
        self.max_bytes = max_bytes
        self.loaded: OrderedDict[str, LoadedAdapter] = OrderedDict()  # oldest use first
        self._loading: dict[str, asyncio.Future[LoadedAdapter]] = {}
        self._waiting: dict[str, int] = {}  # requests waiting for a load, per name
        self._reserved = [0, 0]  # count, bytes of loads between reading and attaching
        self._executor = executor or concurrent.futures.ThreadPoolExecutor(
            max_workers=2, thread_name_prefix="splice-adapter-load"
        )
        self.loads = 0  # loads done (tests and metrics)
        self.evictions = 0

    @property
    def loaded_bytes(self) -> int:
        return sum(e.nbytes for e in self.loaded.values())

    async def acquire(self, name: str) -> None:
        """Hold adapter ``name`` (loading it if needed) until `release`."""
        entry = self.loaded.get(name)
        if entry is not None:
            entry.users += 1
            self.loaded.move_to_end(name)
            return
        future = self._loading.get(name)
        if future is None:
            path = self.sources.resolve(name)  # errors before any work
            future = self._start_load(name, path)
        self._waiting[name] = self._waiting.get(name, 0) + 1
        try:
            await asyncio.shield(future)
        except asyncio.CancelledError:
            if future.done() and not future.cancelled() and future.exception() is None:
                self.release(name)  # the load counted this waiter as a user
            elif name in self._waiting:
                self._waiting[name] -= 1
            raise

    def release(self, name: str) -> None:
        entry = self.loaded.get(name)
        if entry is not None and entry.users > 0:
            entry.users -= 1

    async def load(self, name: str, path: Path) -> bool:
        """Load ``name`` from ``path`` now (``/v1/load_lora_adapter``); False when it is
        already loaded."""
        if name in self.loaded or name in self._loading:
            return False
        await asyncio.shield(self._start_load(name, path))
        return True

    async def unload(self, name: str) -> None:
        """Evict ``name`` now; `AdapterBusyError` while requests use it or it is loading."""
        if name in self._loading:
            raise AdapterBusyError(f"adapter '{name}' is being loaded; retry")
        entry = self.loaded.get(name)
        if entry is None:
            raise KeyError(name)
        if entry.users:
            raise AdapterBusyError(f"adapter '{name}' is in use by {entry.users} request(s)")
        del self.loaded[name]
        await asyncio.wrap_future(self.run_between_steps(lambda: self.am.delete_adapter(name)))
        self.evictions += 1

    # -- loading -------------------------------------------------------------------------

    def _start_load(self, name: str, path: Path) -> asyncio.Future[LoadedAdapter]:
        future = asyncio.ensure_future(self._load(name, path))
        self._loading[name] = future
        self._waiting.setdefault(name, 0)
        future.add_done_callback(lambda _: self._loading.pop(name, None))
        return future

    async def _load(self, name: str, path: Path) -> LoadedAdapter:
        loop = asyncio.get_running_loop()
        try:
            try:
                prepared, nbytes = await loop.run_in_executor(
                    self._executor, self._read_and_build, name, path
                )
            except Exception as e:  # a malformed folder fails this load, not the server
                raise AdapterLoadError(f"adapter '{name}': {_message(e)}") from None
            victims = self._make_room(name, nbytes)
            self._reserved[0] += 1
            self._reserved[1] += nbytes
            try:
                for victim in victims:
                    del self.loaded[victim]

                def attach() -> None:
                    for victim in victims:
                        self.am.delete_adapter(victim)
                    self.am.attach_adapter(prepared, activate=False)
                    for p in self.am.adapter_parameters(name):  # served, not trained
                        p.requires_grad_(False)

                try:
                    await asyncio.wrap_future(self.run_between_steps(attach))
                except Exception as e:
                    raise AdapterLoadError(f"adapter '{name}': {_message(e)}") from None
                finally:
                    self.evictions += len(victims)
            finally:
                self._reserved[0] -= 1
                self._reserved[1] -= nbytes
            entry = LoadedAdapter(name, path, nbytes, users=self._waiting.get(name, 0))
            self.loaded[name] = entry
            self.loads += 1
            return entry
        finally:
            self._waiting.pop(name, None)

    def _read_and_build(self, name: str, path: Path) -> tuple[Any, int]:
        """(the built adapter, its tensors' bytes): the worker thread's half of a load."""
        config, weights = read_adapter(path)
        prepared = build_adapter(self.am, name, config, weights, str(path))
        return prepared, sum(t.numel() * t.element_size() for t in weights.values())

    def _make_room(self, name: str, nbytes: int) -> list[str]:
        """The least recently used idle adapters to evict so that ``name`` fits."""
        if self.max_bytes is not None and nbytes > self.max_bytes:
            raise AdapterLoadError(
                f"adapter '{name}' holds {nbytes} bytes, more than the server's "
                f"max_loaded_bytes ({self.max_bytes})"
            )
        count = len(self.loaded) + self._reserved[0] + 1
        total = self.loaded_bytes + self._reserved[1] + nbytes
        victims: list[str] = []
        for victim, entry in self.loaded.items():
            fits = count <= self.max_loaded and (self.max_bytes is None or total <= self.max_bytes)
            if fits:
                break
            if entry.users == 0:
                victims.append(victim)
                count -= 1
                total -= entry.nbytes
        if count > self.max_loaded or (self.max_bytes is not None and total > self.max_bytes):
            raise AdapterCacheFullError(
                f"cannot load adapter '{name}': the {len(self.loaded)} loaded adapters are in "
                "use by running requests (max_loaded / max_loaded_bytes); retry later"
            )
        return victims


def _message(e: Exception) -> str:
    if isinstance(e, SpliceError):
        return str(e)
    known = expected_failure(e)
    return " ".join(known.split()) if known else f"{type(e).__name__}: {e}"
