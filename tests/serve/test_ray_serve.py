"""Ray Serve (`splice.serve.ray_app`) on a local Ray instance this module starts (2 CPUs, no
dashboard, HTTP on 127.0.0.1): one replica of the tiny base with ``max_loaded=2`` adapters,
the official openai client in front.

Checked: greedy answers for two adapters and the base equal offline ``am.generate`` with
that adapter (alone, one at a time, and concurrently, so in one decode batch); the replica
receives each request with the adapter as its multiplexed model id (it refuses any other),
and Serve's LRU (``max_num_models_per_replica`` = max_loaded) drives the replica's loads and
evictions; an unknown adapter is a 404; Ray's arguments are parsed strictly; a named
composition is one model id whose members the replica loads, and unloads (those no other id
uses) when Serve evicts it.
"""

from __future__ import annotations

import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("ray.serve", reason="ray[serve] is not installed (the 'ray' extra)")

from http_setup import reference_text

APP = "splice-ray-test"
PROMPT = "hello world"
COMPOSITIONS = {"mix": {"average": {"lora": 3, "ia3": 1}}, "bad_mix": {"average": ["lora", "nope"]}}
MIX = {"lora": 0.75, "ia3": 0.25}  # "mix" as the mixed batch's weighted set


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_url(tiny_base: Path, adapter_root: Path):
    import ray
    from ray import serve

    import splice
    from splice.serve.config import ServeConfig
    from splice.serve.ray_app import RayOptions, build_ray_app

    src = str(Path(splice.__file__).resolve().parents[1])  # the replicas import splice
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": src, "HF_HUB_OFFLINE": "1"}},
    )
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        config = ServeConfig(
            base=str(tiny_base),
            adapter_roots=[str(adapter_root)],
            max_loaded=2,
            max_batch=4,
            compositions=COMPOSITIONS,
        )
        serve.run(build_ray_app(config, RayOptions(replicas=1)), name=APP, route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def client(url: str):
    import openai

    return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)


def complete(url: str, model: str, max_tokens: int = 8) -> str:
    answer = client(url).completions.create(
        model=model, prompt=PROMPT, max_tokens=max_tokens, temperature=0
    )
    return answer.choices[0].text


def replica_report() -> dict:
    from ray import serve

    handle = serve.get_deployment_handle("SpliceReplica", app_name=APP)
    return handle.adapter_report.remote().result()


def test_adapters_answer_as_offline_generate_and_route_by_model_id(ray_url, reference):
    want = {m: reference_text(reference, PROMPT, m, 8) for m in ("lora", "dora", None)}
    assert len(set(want.values())) == 3  # the adapters change the answer
    before = len(replica_report()["multiplex_log"])
    assert complete(ray_url, "lora") == want["lora"]
    assert complete(ray_url, "dora") == want["dora"]
    assert complete(ray_url, "tiny-llama") == want[None]  # the base: no model id
    stream = client(ray_url).completions.create(
        model="lora", prompt=PROMPT, max_tokens=8, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in stream if c.choices) == want["lora"]
    log = replica_report()["multiplex_log"][before:]
    assert [e for e in log if e[0] == "load"] == [("load", "lora"), ("load", "dora")]


def test_concurrent_requests_for_two_adapters_keep_their_answers(ray_url, reference):
    models = ["lora", "dora", "tiny-llama", "lora", "dora", "tiny-llama"]
    want = [reference_text(reference, PROMPT, None if m == "tiny-llama" else m, 12) for m in models]
    with ThreadPoolExecutor(len(models)) as pool:
        got = list(pool.map(lambda m: complete(ray_url, m, 12), models))
    assert got == want


def test_serve_lru_evicts_beyond_max_loaded_per_replica(ray_url, reference):
    # max_loaded=2: after lora, dora, ia3 (in that order of last use) Serve evicts lora and
    # the replica unloads it; a new lora request loads it again, evicting dora.
    for model in ("lora", "dora", "ia3"):
        complete(ray_url, model, 2)
    report = replica_report()
    assert report["loaded"] == ["dora", "ia3"]
    assert report["multiplex_log"][-2:] == [("evict", "lora"), ("load", "ia3")]
    assert complete(ray_url, "lora", 8) == reference_text(reference, PROMPT, "lora", 8)
    report = replica_report()
    assert report["loaded"] == ["ia3", "lora"]
    assert report["multiplex_log"][-2:] == [("evict", "dora"), ("load", "lora")]


def test_unknown_adapter_is_a_404_and_path_names_a_400(ray_url):
    import openai

    with pytest.raises(openai.NotFoundError, match="does not exist"):
        complete(ray_url, "nope")
    with pytest.raises(openai.BadRequestError, match="no paths"):
        complete(ray_url, "../lora")


def test_builder_arguments_are_strict(tiny_base, adapter_root):
    from splice.serve.config import ServeConfigError
    from splice.serve.ray_app import parse_ray_args

    args = {"base": str(tiny_base), "adapter_roots": f"{adapter_root}", "replicas": "3",
            "max_loaded": "5", "adapters": f"x={adapter_root / 'lora'}"}  # fmt: skip
    config, options = parse_ray_args(args)
    assert (options.replicas, config.max_loaded) == (3, 5)
    assert config.adapter_roots == [str(adapter_root)]
    assert config.adapters == {"x": str(adapter_root / "lora")}
    with pytest.raises(ServeConfigError, match="replicas"):
        parse_ray_args({"base": str(tiny_base), "replicas": "0"})
    with pytest.raises(ServeConfigError, match="max_loaded"):
        parse_ray_args({"base": str(tiny_base), "max_loadd": "2"})


def test_ray_flags():
    import argparse

    from splice.commands._serve_ray import LOCAL, add_ray_flags, ray_options
    from splice.serve.config import ServeConfigError

    p = argparse.ArgumentParser()
    add_ray_flags(p)
    assert p.parse_args([]).ray is None  # not on Ray
    assert p.parse_args(["--ray"]).ray == LOCAL
    args = p.parse_args(["--ray", "ray://10.0.0.1:10001", "--replicas", "4"])
    assert args.ray == "ray://10.0.0.1:10001"
    assert ray_options(args).replicas == 4
    assert ray_options(p.parse_args(["--ray"])).replicas == 1
    with pytest.raises(ServeConfigError, match="replica_cpus"):
        ray_options(p.parse_args(["--ray", "--replica-cpus", "-1"]))


class FakeCache:
    """An adapter cache double: ``loaded`` names, ``busy`` ones refuse to unload."""

    def __init__(self, loaded, busy=()):
        self.loaded = dict.fromkeys(loaded)
        self.busy = set(busy)

    async def unload(self, name):
        from splice.serve.adapter_cache import AdapterBusyError

        if name in self.busy:
            raise AdapterBusyError(name)
        del self.loaded[name]


def test_a_replica_applies_registry_versions_once_and_retries_busy_drops(adapter_root):
    import asyncio
    from types import SimpleNamespace

    from splice.serve.adapter_sources import AdapterSources
    from splice.serve.ray_app import SpliceReplica

    replica = object.__new__(SpliceReplica.func_or_class)  # no model: the registry part only
    sources = AdapterSources({}, [str(adapter_root)])
    cache = FakeCache(["lora", "x"], busy={"x"})
    replica.state = SimpleNamespace(sources=sources, cache=cache)
    replica.applied, replica.registry_errors = {}, {}
    apply = replica._apply_registry
    registry = {"lora": (None, 1), "x": (str(adapter_root / "dora"), 2),
                "y": (str(adapter_root / "ia3"), 3), "z": ("/etc", 4)}  # fmt: skip
    asyncio.run(apply(registry))
    assert list(cache.loaded) == ["x"]  # lora dropped (tombstone); x busy: kept, unapplied
    assert replica.applied == {"lora": 1, "y": 3, "z": 4}
    assert sources.runtime == {"y": adapter_root / "ia3"}
    assert replica.registry_errors["z"].status == 400  # outside the roots here
    cache.busy.clear()
    asyncio.run(apply(registry))
    assert cache.loaded == {} and replica.applied["x"] == 2
    assert sources.resolve("x") == adapter_root / "dora"


def test_an_evicted_id_drops_the_adapters_no_other_id_uses():
    from splice.serve.ray_app import SpliceReplica
    from splice.serve.state import ServerState

    replica = object.__new__(SpliceReplica.func_or_class)  # no model: the bookkeeping only
    compositions = {"mix": (("a", 0.5), ("b", 0.5)), "mix2": (("b", 0.5), ("c", 0.5))}
    replica.state = ServerState(None, None, None, "base", compositions=compositions)
    replica.live, replica.loading = {"mix", "mix2", "a", "d"}, {"e": 1}
    assert replica._forget("mix") == []  # a: the id "a"; b: mix2
    assert replica.live == {"mix2", "a", "d"}
    assert replica._forget("mix2") == ["b", "c"]
    assert replica._forget("d") == ["d"]
    replica.loading["mix"] = 1  # a request here is loading mix: its members stay
    assert replica._forget("a") == []
    assert replica._forget("e") == []  # being loaded again
    del replica.loading["mix"]
    replica.live = {"mix"}
    assert replica._forget("mix") == ["a", "b"]


def test_replica_refusals_keep_their_status_and_runtime_loads_reach_the_replicas(
    ray_url, reference
):
    import openai
    from http_setup import RunningServer

    http = RunningServer(ray_url, None, None, None)
    # a malformed adapter folder fails in the replica: 400 invalid_adapter, as `splice serve`
    with pytest.raises(openai.BadRequestError, match="broken") as refused:
        complete(ray_url, "broken")
    assert refused.value.code == "invalid_adapter"
    with pytest.raises(openai.BadRequestError, match="broken"):  # streamed: before any byte
        client(ray_url).completions.create(model="broken", prompt=PROMPT, stream=True)

    r = http.post("/v1/load_lora_adapter", {"lora_name": "rt", "lora_path": "dora"})
    assert r.status == 200, r.text
    assert complete(ray_url, "rt") == reference_text(reference, PROMPT, "dora", 8)
    assert "rt" in [m["id"] for m in http.get("/v1/models").json()["data"]]
    assert http.post("/v1/load_lora_adapter", {"lora_name": "rt", "lora_path": "ia3"}).status == 400
    r = http.post("/v1/load_lora_adapter", {"lora_name": "bad", "lora_path": "broken"})
    assert (r.status, r.json()["error"]["code"]) == (400, "invalid_adapter")
    r = http.post("/v1/load_lora_adapter", {"lora_name": "up", "lora_path": "../x"})
    assert r.status == 400
    assert http.post("/v1/unload_lora_adapter", {"lora_name": "rt"}).status == 200
    with pytest.raises(openai.NotFoundError):
        complete(ray_url, "rt")
    # registered again, to another folder: the replica drops its old copy first
    r = http.post("/v1/load_lora_adapter", {"lora_name": "rt", "lora_path": "ia3"})
    assert r.status == 200, r.text
    assert complete(ray_url, "rt") == reference_text(reference, PROMPT, "ia3", 8)


def test_a_named_composition_is_served_and_its_members_evicted_with_it(ray_url, reference):
    """ "mix" (an Average of lora and ia3) is one multiplexed model id: the replica loads both
    members and answers as offline generate with the weighted set. When Serve's LRU evicts
    "mix", the replica unloads ia3 but keeps lora, which the id "lora" (held by Serve) uses."""
    import openai

    want = reference_text(reference, PROMPT, MIX, 8)
    assert want not in (reference_text(reference, PROMPT, m, 8) for m in ("lora", "ia3", None))
    assert "mix" in {m.id for m in client(ray_url).models.list().data}
    complete(ray_url, "dora", 2)
    complete(ray_url, "lora", 2)  # Serve holds [dora, lora]
    assert complete(ray_url, "mix") == want  # evicts dora; loads lora (there) and ia3
    report = replica_report()
    assert report["loaded"] == ["ia3", "lora"]
    assert report["multiplex_log"][-2:] == [("evict", "dora"), ("load", "mix")]
    stream = client(ray_url).completions.create(
        model="mix", prompt=PROMPT, max_tokens=8, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in stream if c.choices) == want
    complete(ray_url, "lora", 2)  # Serve holds [mix, lora], mix least recently used
    complete(ray_url, "dora", 2)  # evicts mix: ia3 unloaded, lora kept (the id "lora" uses it)
    report = replica_report()
    assert report["loaded"] == ["dora", "lora"]
    assert report["multiplex_log"][-2:] == [("evict", "mix"), ("load", "dora")]
    assert complete(ray_url, "mix") == want  # loaded again
    with pytest.raises(openai.NotFoundError, match="'nope' does not exist"):
        complete(ray_url, "bad_mix")  # an unknown member: 404 at the ingress, naming it
