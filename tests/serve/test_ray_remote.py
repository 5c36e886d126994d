"""The Ray ingress's engine and cache stand-ins (`splice.serve.ray_remote`) against a fake
replica handle (no Ray): what reaches the handle, the model id of each call, cancellation,
replica failures, and the adapter-name checks done at the ingress."""

from __future__ import annotations

import asyncio

import pytest

from splice.serve.adapter_cache import AdapterBusyError, AdapterLoadError
from splice.serve.adapter_sources import AdapterPathError, AdapterSources, UnknownAdapterError
from splice.serve.ray_remote import RemoteAdapterCache, RemoteEngine
from splice.serve.requests import EngineError, GenerationRequest, TokenEvent


class FakeStream:
    """A streaming call's answer: the events given, then optionally an exception; or
    waits forever after them (``hang``)."""

    def __init__(self, events, error=None, hang=False):
        self.events, self.error, self.hang = list(events), error, hang
        self.cancelled = False

    def __aiter__(self):
        return self._gen()

    async def _gen(self):
        for e in self.events:
            await asyncio.sleep(0)
            yield e
        if self.error is not None:
            raise self.error
        if self.hang:
            await asyncio.Event().wait()

    def cancel(self):
        self.cancelled = True


class FakeReplicas:
    """A DeploymentHandle double recording each call's options."""

    def __init__(self, make_stream):
        self.make_stream = make_stream
        self.calls: list[dict] = []
        self.streams: list[FakeStream] = []
        self.registries: list = []
        self._options: dict = {}

    def options(self, **kw):
        twin = FakeReplicas(self.make_stream)
        twin.calls, twin.streams, twin._options = self.calls, self.streams, {**self._options, **kw}
        twin.registries = self.registries
        return twin

    def remote(self, request, registry=None):
        self.calls.append({**self._options, "request_id": request.request_id})
        self.registries.append(registry)
        stream = self.make_stream(request)
        self.streams.append(stream)
        return stream


def events_for(request, n=2):
    rid = request.request_id
    toks = [TokenEvent(rid, 10 + i, f"t{i}") for i in range(n - 1)]
    return [*toks, TokenEvent(rid, 10 + n - 1, f"t{n - 1}", "length")]


async def collect(handle):
    return [e async for e in handle]


def run(coro):
    return asyncio.run(coro)


def test_events_are_relayed_and_the_adapter_is_the_model_id():
    replicas = FakeReplicas(lambda r: FakeStream(events_for(r, 3)))
    engine = RemoteEngine(replicas)

    async def main():
        loop = asyncio.get_running_loop()
        a = engine.submit(GenerationRequest("a", [1, 2], "lora"), loop=loop)
        b = engine.submit(GenerationRequest("b", [1, 2], None), loop=loop)
        assert engine.stats.running == 2
        got = await collect(a), await collect(b)
        await asyncio.sleep(0)
        return got

    got_a, got_b = run(main())
    assert [e.text for e in got_a] == ["t0", "t1", "t2"]
    assert got_a[-1].finish_reason == "length"
    assert [e.request_id for e in got_b] == ["b"] * 3
    assert replicas.calls == [
        {"method_name": "generate", "stream": True, "multiplexed_model_id": "lora",
         "request_id": "a"},
        {"method_name": "generate", "stream": True, "request_id": "b"},  # base: no model id
    ]  # fmt: skip
    assert engine.stats.running == 0


def test_cancel_cancels_the_remote_call_and_ends_with_abort():
    replicas = FakeReplicas(lambda r: FakeStream(events_for(r, 2)[:1], hang=True))
    engine = RemoteEngine(replicas)

    async def main():
        handle = engine.submit(GenerationRequest("a", [1], "lora"), loop=asyncio.get_running_loop())
        it = aiter(handle)
        first = await anext(it)
        handle.cancel()
        rest = [e async for e in it]
        return first, rest

    first, rest = run(main())
    assert first.text == "t0"
    assert [e.finish_reason for e in rest] == ["abort"]
    assert replicas.streams[0].cancelled


def test_a_reading_task_cancelled_before_it_ran_still_ends_the_handle():
    replicas = FakeReplicas(lambda r: FakeStream([], hang=True))
    engine = RemoteEngine(replicas)

    async def main():
        handle = engine.submit(GenerationRequest("a", [1], None), loop=asyncio.get_running_loop())
        handle.task.cancel()  # before its first step: no remote call, no except clause
        return await asyncio.wait_for(collect(handle), 5)

    assert [e.finish_reason for e in run(main())] == ["abort"]
    assert replicas.calls == []


@pytest.mark.parametrize(
    ("stream", "message"),
    [
        (FakeStream([], error=RuntimeError("boom\nActorDiedError: the replica died")), "died"),
        (FakeStream([TokenEvent("a", 1, "x")]), "without a final event"),
    ],
)
def test_a_failed_or_cut_stream_ends_with_an_error(stream, message):
    engine = RemoteEngine(FakeReplicas(lambda r: stream))

    async def main():
        handle = engine.submit(GenerationRequest("a", [1], None), loop=asyncio.get_running_loop())
        return await collect(handle)

    last = run(main())[-1]
    assert last.finish_reason == "error"
    assert message in last.error


def test_submit_needs_a_loop_and_a_running_engine():
    engine = RemoteEngine(FakeReplicas(lambda r: FakeStream(events_for(r))))
    with pytest.raises(EngineError, match="loop="):
        engine.submit(GenerationRequest("a", [1], None))
    assert engine.stop(drain=True, timeout=1)

    async def main():
        engine.submit(GenerationRequest("a", [1], None), loop=asyncio.get_running_loop())

    with pytest.raises(EngineError, match="shutting down"):
        run(main())


def test_adapter_names_are_resolved_at_the_ingress(tmp_path):
    root = tmp_path / "adapters"
    (root / "lora").mkdir(parents=True)
    cache = RemoteAdapterCache(AdapterSources({}, [str(root)]), RemoteEngine(None))
    run(cache.acquire("lora"))  # exists: counted as in flight, nothing else happens here
    with pytest.raises(UnknownAdapterError):
        run(cache.acquire("other"))
    with pytest.raises(AdapterPathError, match="no paths"):
        run(cache.acquire("../lora"))
    with pytest.raises(AdapterBusyError, match="in use by 1 request"):
        run(cache.unload("lora"))
    cache.release("lora")
    assert cache.holds == {} and cache.loaded == {}


class FakeCall:
    """``handle.options(...).remote(...)`` of the replicas' ``load_runtime``: records the
    call, answers ``answer`` (None: loaded; a TokenEvent: refused)."""

    def __init__(self, answer):
        self.answer, self.calls, self._options = answer, [], {}

    def options(self, **kw):
        self._options = kw
        return self

    def remote(self, name, registry):
        self.calls.append((self._options, name, registry))

        async def answer():
            return self.answer

        return answer()


def test_runtime_load_registers_then_one_replica_loads_and_refusals_roll_back(tmp_path):
    from splice.serve.api_errors import ApiError

    root = tmp_path / "adapters"
    (root / "x").mkdir(parents=True)
    refusal = TokenEvent("load", None, "", "error", "bad folder", 400, "invalid_adapter", "model")
    replicas = FakeCall(refusal)
    engine = RemoteEngine(replicas)
    cache = RemoteAdapterCache(AdapterSources({}, [str(root)]), engine)
    with pytest.raises(ApiError, match="bad folder") as refused:
        run(cache.load("y", root / "x"))
    assert (refused.value.status, refused.value.code) == (400, "invalid_adapter")
    options, name, registry = replicas.calls[0]
    assert options == {"method_name": "load_runtime", "multiplexed_model_id": "y"}
    assert (name, registry) == ("y", {"y": (str(root / "x"), 1)})
    assert cache.registry.entries == {"y": (None, 2)}  # withdrawn: a tombstone, new version

    replicas.answer = None
    assert run(cache.load("y", root / "x"))
    assert cache.registry.entries == {"y": (str(root / "x"), 3)}
    with pytest.raises(AdapterLoadError, match="already loaded"):
        run(cache.load("y", root / "x"))
    run(cache.unload("y"))
    assert cache.registry.entries == {"y": (None, 4)}
    with pytest.raises(KeyError):  # neither registered nor in a root: the app's 404
        run(cache.unload("y"))
    run(cache.unload("x"))  # a root adapter: every replica drops its loaded copy
    assert cache.registry.entries["x"] == (None, 5)


def test_a_replica_refusal_is_an_api_error_from_generation_start(tmp_path):
    from splice.serve.api_errors import ApiError
    from splice.serve.generation import Generation
    from splice.serve.requests import SamplingParams
    from splice.serve.state import ServerState

    root = tmp_path / "adapters"
    (root / "lora").mkdir(parents=True)

    def refuse(request):
        event = TokenEvent(request.request_id, None, "", "error", "prompt too long", 400, None, "p")
        return FakeStream([event])

    engine = RemoteEngine(FakeReplicas(refuse))
    cache = RemoteAdapterCache(AdapterSources({}, [str(root)]), engine)
    state = ServerState(engine=engine, tokenizer=None, cache=cache, base_id="base")
    engine.registry.set("z", "/somewhere")

    async def main():
        generation = Generation(state, "lora", "lora", [[1, 2]], SamplingParams())
        try:
            await generation.start()
        finally:
            await generation.close()
            await asyncio.sleep(0.05)  # the hold is released by a background task

    with pytest.raises(ApiError, match="prompt too long") as refused:
        run(main())
    assert (refused.value.status, refused.value.param) == (400, "p")
    assert cache.holds == {}  # the hold ended with the request
    assert engine.replicas.registries == [{"z": ("/somewhere", 1)}]  # sent with the call
