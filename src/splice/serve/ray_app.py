"""`splice serve` scaled out with Ray Serve: replicas of the base model, adapters spread over
them by Serve's model multiplexing (the adapter name is the model id), each replica with its
own adapter LRU.

    serve run splice.serve.ray_app:app_builder base=smollm2 adapter_roots=./adapters \\
        replicas=2 max_loaded=8
    serve run splice.serve.ray_app:app_builder config=serve.yaml replicas=4
    splice serve smollm2 --adapter-root ./adapters --ray [ADDRESS]   (`run_on_ray`)

Two deployments (docs/ray.md):

* `SpliceIngress` (one replica, no CPU reserved): the HTTP app of `splice serve`
  (`splice.serve.app.build_app`, unchanged: routes, keys, limits, response and SSE shapes,
  errors) over a `ServerState` whose engine and adapter cache are the stand-ins of
  `splice.serve.ray_remote`. It tokenizes, checks the request and the adapter name (same
  resolution rules as `splice serve`), and streams each generation from a replica with
  ``handle.options(multiplexed_model_id=ADAPTER)``: Serve sends it to a replica that holds
  that adapter when there is one, else to one that loads it.
* `SpliceReplica` (``replicas`` of them, ``replica_cpus`` CPUs each): what `splice serve`
  builds (`splice.serve.server.build_state`: base model, `BatchingEngine`, `AdapterCache`),
  plus the multiplexed loader ``load_adapter``, made with
  ``serve.multiplexed(max_num_models_per_replica=max_loaded)``. Each request first calls
  it (Serve's LRU bookkeeping: the replica reports the adapters it holds, which drives the
  routing), then runs through the engine like a `splice serve` request (`Generation`: the
  adapter is held from submission to the last token, so neither LRU can drop it mid-request).
  When Serve's LRU evicts an adapter, the replica unloads it from its cache unless requests
  still use it (then the cache's own LRU, with the same ``max_loaded``, drops it later).

Requests for different adapters that land on one replica share its decode batch, as in
`splice serve`. The base model's id routes with no model id (any replica).

Named compositions (``compositions:`` in the config, an Average of adapter names served as a
model id): the composition's name is the multiplexed model id. The ingress resolves and holds
each member (an unknown member is a 404 naming it, before any remote call); the replica's
loader loads every member into its cache (`SpliceReplica._load`), and the rows run as the
weighted set, as in `splice serve`. In Serve's LRU a composition counts as one model id; its
members take their own places in the replica's adapter cache (``max_loaded`` adapters, which
drops idle ones LRU-first when it needs room). When Serve evicts an id, the replica unloads
the adapters of that id that no other id it holds (or is loading) uses: evicting a
composition keeps a member that is also served alone, or by another composition.

Errors: a request a replica refuses reaches the client with the status and OpenAI error body
`splice serve` would give (the refusal travels as an "error" `TokenEvent` carrying its HTTP
status; `splice.serve.ray_remote`).

Runtime loading (``/v1/load_lora_adapter`` / ``unload``): the ingress checks the path (the
adapter roots' rules) and records name -> folder in its registry; every call to a replica
carries the registry, which the replica applies first (`SpliceReplica._apply_registry`:
register the folder in its sources, drop a stale loaded copy), so any replica can load a
runtime adapter on demand through the multiplexed loader, and an unloaded one is dropped by
each replica at its next call.

Every node that may host a replica needs BASE and the adapter folders at the same paths
(a shared file system, or the same copies), as the ingress and replicas resolve them there.
Keys' rate limits are counted per ingress replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

from pydantic import Field
from ray import serve

from splice.config_errors import StrictConfig, parse_config
from splice.serve.adapter_cache import AdapterBusyError
from splice.serve.adapter_sources import AdapterPathError
from splice.serve.api_errors import ApiError
from splice.serve.config import ServeConfig, ServeConfigError, load_serve_config
from splice.serve.generation import adapter_error, error_event
from splice.serve.ray_remote import Registration
from splice.serve.requests import GenerationRequest, TokenEvent

INGRESS_MAX_ONGOING = 4096  # the ingress only forwards: let the replicas' queues push back


class RayOptions(StrictConfig):
    """The Ray-only settings (the rest are `ServeConfig`'s keys)."""

    replicas: int = Field(1, ge=1)
    replica_cpus: float = Field(1.0, ge=0)  # CPUs Ray reserves per replica


def _one_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[-1] if lines else type(e).__name__


class ReplicaAdapter:
    """What the multiplexed loader returns for one adapter: Serve keeps it in its LRU and,
    when it evicts the adapter, calls ``__del__`` (in a worker thread), which unloads the
    adapter from the replica's cache."""

    def __init__(self, replica: SpliceReplica, name: str) -> None:
        self.replica = replica
        self.name = name
        self._released = False

    def __del__(self) -> None:
        if self._released:
            return
        self._released = True
        self.replica.evict(self.name)


@serve.deployment
class SpliceReplica:
    """The base model, its engine and adapter cache, and the multiplexed adapter loader."""

    def __init__(self, config: dict[str, Any]) -> None:
        from splice.serve.server import build_state

        self.config = ServeConfig(**config)
        self.state = build_state(self.config)
        self.state.start()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.loop_thread: int | None = None
        self.multiplex_log: list[tuple[str, str]] = []  # ("load" | "evict", model id)
        self.live: set[str] = set()  # the model ids Serve's LRU holds here
        self.loading: dict[str, int] = {}  # model ids being readied for requests here
        self.applied: dict[str, int] = {}  # registry versions applied, per adapter
        self.registry_errors: dict[str, ApiError] = {}  # registrations this replica refused

        async def load(name: str) -> ReplicaAdapter:
            return await self._load(name)

        self.load_adapter = serve.multiplexed(max_num_models_per_replica=self.config.max_loaded)(
            load
        )

    async def _load(self, name: str) -> ReplicaAdapter:
        """Load ``name``'s adapters into the cache: the adapter, or every member of the named
        composition ``name`` (all held until the last is loaded, so loading one cannot evict
        another; a member that fails is the `ApiError` naming it)."""
        self.loop = asyncio.get_running_loop()
        self.loop_thread = threading.get_ident()
        cache = self.state.cache
        held: list[str] = []
        try:
            for member in self.state.adapters_of(name):
                try:
                    await cache.acquire(member)  # read off the decode loop, attached between steps
                except Exception as e:
                    if member == name:
                        raise
                    raise adapter_error(e, member) from None
                held.append(member)
        finally:
            for member in held:
                cache.release(member)
        self.live.add(name)
        self.multiplex_log.append(("load", name))
        return ReplicaAdapter(self, name)

    def evict(self, name: str) -> None:
        """Serve's LRU dropped the model id ``name`` (an adapter or a named composition): unload
        its adapters that no other id Serve still holds here, or that a request here is loading,
        uses (a composition's member also served alone or by another composition stays; an id
        is evicted to make room for the one being loaded), each unless requests use it
        (then the cache's own LRU drops it later). From Serve's worker thread, wait for it (so
        the next load finds the room), from the loop's own thread, schedule it."""
        self.multiplex_log.append(("evict", name))
        drop = self._forget(name)
        loop = self.loop
        if not drop or loop is None or loop.is_closed():
            return
        if self.loop_thread == threading.get_ident():
            loop.create_task(self._unload_idle(drop))
            return
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self._unload_idle(drop), loop).result(timeout=120)

    def _forget(self, name: str) -> list[str]:
        """Drop the id ``name`` from those Serve holds here; its adapters no other held or
        loading id uses (the id being loaded, which caused the eviction, included)."""
        self.live.discard(name)
        users = self.live | set(self.loading)
        kept = {a for other in users for a in self.state.adapters_of(other)}
        return [a for a in self.state.adapters_of(name) if a not in kept]

    async def _unload_idle(self, names: list[str]) -> None:
        for name in names:
            with contextlib.suppress(KeyError, AdapterBusyError):
                await self.state.cache.unload(name)

    async def _apply_registry(self, registry: dict[str, Registration]) -> None:
        """Apply the ingress's runtime registrations this replica has not seen: drop the
        loaded copy of the adapter (skipped while requests here use it: retried at the next
        call, the version staying unapplied), then register its folder (checked against this
        replica's roots) or, for a tombstone, forget it."""
        sources, cache = self.state.sources, self.state.cache
        for name, (folder, version) in registry.items():
            if self.applied.get(name) == version:
                continue
            if name in cache.loaded:
                try:
                    await cache.unload(name)
                except KeyError:
                    pass
                except AdapterBusyError:
                    continue
            self.registry_errors.pop(name, None)
            sources.runtime.pop(name, None)
            if folder is not None:
                try:
                    sources.runtime[name] = sources.resolve_path(folder)
                except AdapterPathError as e:
                    self.registry_errors[name] = ApiError(
                        400, str(e), code="invalid_adapter", param="lora_path"
                    )
            self.applied[name] = version

    async def _ready(self, adapter: str, registry: dict[str, Registration]) -> None:
        """Registry applied and ``adapter`` loaded here (Serve's multiplexed loader), or the
        `ApiError` `splice serve` would answer. ``adapter`` may name a composition: its
        members are checked and loaded (`_load`)."""
        await self._apply_registry(registry)
        for name in self.state.adapters_of(adapter):  # a composition: each member
            if name in self.registry_errors:
                raise self.registry_errors[name]
            version = registry.get(name, (None, None))[1]
            if version is not None and self.applied.get(name) != version:
                raise ApiError(
                    503, f"adapter '{name}' is being replaced on this replica; retry", code="busy"
                )
        self.loading[adapter] = self.loading.get(adapter, 0) + 1
        try:
            await self.load_adapter(adapter)
        except ApiError:
            raise
        except Exception as e:
            try:
                api = adapter_error(e, adapter)
            except Exception:
                api = ApiError(500, f"adapter '{adapter}': {_one_line(e)}")
            raise api from None
        finally:
            left = self.loading[adapter] - 1
            if left:
                self.loading[adapter] = left
            else:
                del self.loading[adapter]

    async def load_runtime(self, name: str, registry: dict[str, Registration]) -> TokenEvent | None:
        """``/v1/load_lora_adapter`` at the ingress: apply the registry and load ``name``
        here; None, or the refusal as an "error" event (its HTTP status)."""
        try:
            await self._ready(name, registry)
        except ApiError as e:
            return error_event("load", e)
        return None

    async def generate(
        self, request: GenerationRequest, registry: dict[str, Registration] | None = None
    ) -> AsyncIterator[TokenEvent]:
        """The request's token events, as `splice serve` produces them (streamed); a
        refusal is one "error" event carrying its HTTP status (`error_event`)."""
        from splice.serve.generation import Generation

        rid = request.request_id
        adapter = request.adapter
        if adapter is not None:
            routed = serve.get_multiplexed_model_id()
            if routed != adapter:
                error = f"routed with model id {routed!r} for adapter {adapter!r}"
                yield TokenEvent(rid, None, "", "error", error)
                return
            try:
                await self._ready(adapter, registry or {})
            except ApiError as e:
                yield error_event(rid, e)
                return
        elif registry:
            await self._apply_registry(registry)
        model = adapter or self.state.base_id
        prompts = [list(request.prompt_ids)]
        generation = Generation(self.state, model, adapter, prompts, request.params)
        try:
            await generation.start()
            async for _, event in generation.events():
                yield dataclasses.replace(event, request_id=rid)
        except ApiError as e:
            yield error_event(rid, e)
        finally:
            await generation.close()

    def __del__(self) -> None:
        """Serve's replica shutdown (after its in-flight requests ended): stop the engine,
        letting anything it still holds finish."""
        with contextlib.suppress(Exception):
            self.state.stop(drain=True, timeout=self.config.shutdown_timeout)

    def adapter_report(self) -> dict[str, Any]:
        """This replica's id, the adapters its cache holds, and its multiplexing log."""
        return {
            "replica": serve.get_replica_context().replica_id.unique_id,
            "loaded": sorted(self.state.cache.loaded),
            "multiplex_log": list(self.multiplex_log),
        }


def ingress_state(config: ServeConfig, replicas: Any) -> Any:
    """The ingress's `ServerState`: tokenizer, keys, limits and adapter sources as
    `build_state` makes them, the engine and cache the remote stand-ins (no model weights)."""
    from transformers import AutoConfig, AutoTokenizer

    from splice.serve.ray_remote import RemoteAdapterCache, RemoteEngine
    from splice.serve.server import preflight
    from splice.serve.state import ServeLimits, ServerState

    checked = preflight(config)
    engine = RemoteEngine(replicas)
    tokenizer = AutoTokenizer.from_pretrained(checked.base_folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    context = getattr(AutoConfig.from_pretrained(checked.base_folder), "max_position_embeddings", 0)
    limits = ServeLimits(
        max_tokens=config.max_tokens,
        max_prompt_tokens=config.max_prompt_tokens,
        max_prompts=config.max_batch,
        context_length=context if isinstance(context, int) and context > 0 else None,
    )
    return ServerState(
        engine=engine,
        tokenizer=tokenizer,
        cache=RemoteAdapterCache(checked.sources, engine),
        base_id=config.base_id(),
        keys=checked.keys,
        limits=limits,
        compositions=config.composition_sets(),
    )


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=INGRESS_MAX_ONGOING)
@serve.ingress()
class SpliceIngress:
    """The OpenAI-compatible HTTP app over the replicas."""

    def __init__(self, config: dict[str, Any], replicas: Any) -> None:
        self.state = ingress_state(ServeConfig(**config), replicas)

    def __serve_build_asgi_app__(self) -> Any:
        from splice.serve.app import build_app

        return build_app(self.state)


def build_ray_app(config: ServeConfig, options: RayOptions) -> Any:
    """The Serve application (ingress bound to the replica deployment) for ``config``."""
    data = config.model_dump(mode="json")
    replica = SpliceReplica.options(
        num_replicas=options.replicas,
        max_ongoing_requests=max(8, 2 * config.max_batch),  # a batch running, one waiting
        ray_actor_options={"num_cpus": options.replica_cpus},
    ).bind(data)
    return SpliceIngress.bind(data, replica)


def _split(value: Any, what: str) -> Any:
    """``serve run`` passes ``key=value`` strings: "A,B" lists and "N=P,N=P" mappings."""
    if not isinstance(value, str):
        return value
    items = [v.strip() for v in value.split(",") if v.strip()]
    if what == "list":
        return items
    from splice.serve.config import parse_adapter_flags

    return parse_adapter_flags(items)


def parse_ray_args(args: dict[str, Any]) -> tuple[ServeConfig, RayOptions]:
    """`app_builder`'s arguments: ``config`` (a `splice serve` YAML file), any of its keys
    (they win over the file's), and `RayOptions`' keys."""
    args = dict(args)
    path = args.pop("config", None)
    ray_keys = {k: args.pop(k) for k in list(args) if k in RayOptions.model_fields}
    options = parse_config(RayOptions, ray_keys, "Ray options", ServeConfigError, list_valid=True)
    if "adapters" in args:
        args["adapters"] = _split(args["adapters"], "mapping")
    if "adapter_roots" in args:
        args["adapter_roots"] = _split(args["adapter_roots"], "list")
    return load_serve_config(path, args), options


def app_builder(args: dict[str, Any]) -> Any:
    """The ``serve run`` target: ``serve run splice.serve.ray_app:app_builder KEY=VALUE ...``
    (keys: ``config``, `ServeConfig`'s, ``replicas``, ``replica_cpus``)."""
    from splice.serve.server import preflight

    config, options = parse_ray_args(args)
    preflight(config)  # the keys file, adapter folders and BASE, before deploying
    return build_ray_app(config, options)


def run_on_ray(config: ServeConfig, options: RayOptions, address: str | None) -> int:
    """`splice serve --ray [ADDRESS]`: connect to the Ray cluster at ``address`` (None: the
    one RAY_ADDRESS names, else a new local instance), serve on ``config.host:port`` until
    Ctrl-C or SIGTERM, then delete the application (Serve drains its replicas)."""
    import signal

    import ray

    from splice.serve.server import preflight

    preflight(config)

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    ray.init(address=address or None)
    # after ray.init, which installs its own SIGTERM handler (a crash report, no clean-up)
    signal.signal(signal.SIGTERM, interrupt)
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:  # started in the background
        signal.signal(signal.SIGINT, interrupt)
    try:
        serve.start(http_options={"host": config.host, "port": config.port})
        serve.run(build_ray_app(config, options), name="splice", route_prefix="/")
        print(
            f"splice serve: {config.base_id()} on Ray Serve ({options.replicas} replica(s)) at "
            f"http://{config.host}:{config.port}/v1 (Ctrl-C stops it)",
            flush=True,
        )
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                time.sleep(3600)
    finally:
        with contextlib.suppress(Exception):
            serve.delete("splice")
        ray.shutdown()
    return 0
