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
        self._options: dict = {}

    def options(self, **kw):
        twin = FakeReplicas(self.make_stream)
        twin.calls, twin.streams, twin._options = self.calls, self.streams, {**self._options, **kw}
        return twin

    def remote(self, request):
        self.calls.append({**self._options, "request_id": request.request_id})
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
    cache = RemoteAdapterCache(AdapterSources({}, [str(root)]))
    run(cache.acquire("lora"))  # exists: nothing else happens here
    with pytest.raises(UnknownAdapterError):
        run(cache.acquire("other"))
    with pytest.raises(AdapterPathError, match="no paths"):
        run(cache.acquire("../lora"))
    with pytest.raises(AdapterLoadError, match="adapter root"):
        run(cache.load("x", root / "lora"))
    with pytest.raises(AdapterBusyError, match="least recently used"):
        run(cache.unload("lora"))
    assert cache.loaded == {}
