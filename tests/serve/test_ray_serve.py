"""Ray Serve (`splice.serve.ray_app`) on a local Ray instance this module starts (2 CPUs, no
dashboard, HTTP on 127.0.0.1): one replica of the tiny base with ``max_loaded=2`` adapters,
the official openai client in front.

Checked: greedy answers for two adapters and the base equal offline ``am.generate`` with
that adapter (alone, one at a time, and concurrently, so in one decode batch); the replica
receives each request with the adapter as its multiplexed model id (it refuses any other),
and Serve's LRU (``max_num_models_per_replica`` = max_loaded) drives the replica's loads and
evictions; an unknown adapter is a 404; Ray's arguments are parsed strictly.
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
            base=str(tiny_base), adapter_roots=[str(adapter_root)], max_loaded=2, max_batch=4
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
