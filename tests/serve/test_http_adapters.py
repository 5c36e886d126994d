"""Runtime adapters over HTTP: vLLM's load / unload calls, LRU eviction, traversal attempts
in ``lora_path``, and malformed folders failing their own call while the server serves on."""

from __future__ import annotations

import os
import shutil
import time

import openai
import pytest
from http_setup import reference_text, serve


@pytest.fixture(scope="module")
def runtime(tiny_base, adapter_root, tmp_path_factory):
    """A server over a root holding copies of the adapters under other names, a link out of
    the root and an adapter outside it; at most 2 adapters loaded."""
    root = tmp_path_factory.mktemp("runtime-root")
    outside = tmp_path_factory.mktemp("outside")
    shutil.copytree(adapter_root / "lora", root / "pack" / "first")
    shutil.copytree(adapter_root / "ia3", root / "pack" / "second")
    shutil.copytree(adapter_root / "broken", root / "pack" / "broken")
    shutil.copytree(adapter_root / "dora", outside / "secret")
    os.symlink(outside / "secret", root / "pack" / "link_out")
    (root / "pack" / "empty").mkdir()
    with serve(tiny_base, adapter_roots=[str(root)], max_loaded=2) as running:
        running.root, running.outside = root, outside
        yield running


def _load(server, name, path):
    return server.post("/v1/load_lora_adapter", {"lora_name": name, "lora_path": path})


def test_load_use_unload(runtime, reference):
    r = _load(runtime, "alpha", "pack/first")
    assert r.status == 200 and "alpha" in r.text
    assert "alpha" in {m.id for m in runtime.client().models.list().data}
    got = runtime.client().completions.create(
        model="alpha", prompt="abc", max_tokens=8, temperature=0
    )
    assert got.choices[0].text == reference_text(reference, "abc", "lora", 8)
    again = _load(runtime, "alpha", "pack/first")
    assert again.status == 400 and "already loaded" in again.json()["error"]["message"]
    r = runtime.post("/v1/unload_lora_adapter", {"lora_name": "alpha"})
    assert r.status == 200 and "alpha" not in runtime.state.cache.am.configs
    assert "alpha" not in {m.id for m in runtime.client().models.list().data}
    with pytest.raises(openai.NotFoundError):
        runtime.client().completions.create(model="alpha", prompt="abc", max_tokens=2)
    r = runtime.post("/v1/unload_lora_adapter", {"lora_name": "alpha"})
    assert r.status == 404 and r.json()["error"]["code"] == "model_not_found"


def test_absolute_path_inside_a_root_and_lru_eviction(runtime, reference):
    for name, path in [("a1", "pack/first"), ("a2", str(runtime.root / "pack" / "second"))]:
        assert _load(runtime, name, path).status == 200
    client = runtime.client()
    client.completions.create(model="a1", prompt="x", max_tokens=1)  # a1 most recent
    assert _load(runtime, "a3", "pack/first").status == 200  # max_loaded 2: a2 goes
    assert list(runtime.state.cache.loaded)[-2:] == ["a1", "a3"]
    assert "a2" not in runtime.state.cache.am.configs
    # a2 stays registered: loaded again on its next use, with its own values
    got = client.completions.create(model="a2", prompt="abc", max_tokens=8, temperature=0)
    assert got.choices[0].text == reference_text(reference, "abc", "ia3", 8)
    for name in ("a1", "a2", "a3"):
        runtime.post("/v1/unload_lora_adapter", {"lora_name": name})


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("../outside/secret", "'..' is not allowed"),
        ("pack/../../x", "'..' is not allowed"),
        ("/etc", "outside the adapter roots"),
        ("pack/link_out", "leads outside"),
        ("pack/nothing", "no such folder"),
    ],
)
def test_lora_path_traversal_is_refused(runtime, path, message):
    r = _load(runtime, "evil", path)
    assert r.status == 400 and message in r.json()["error"]["message"]
    assert r.json()["error"]["param"] == "lora_path"
    assert "evil" not in runtime.state.sources.runtime


def test_absolute_path_outside_the_roots_is_refused(runtime):
    r = _load(runtime, "evil", str(runtime.outside / "secret"))
    assert r.status == 400 and "outside the adapter roots" in r.json()["error"]["message"]


def test_malformed_adapters_fail_their_call_only(runtime, reference):
    for path, message in [("pack/broken", "shape"), ("pack/empty", "adapter_config.json")]:
        r = _load(runtime, "bad", path)
        assert r.status == 400 and message in r.json()["error"]["message"], r.text
        assert "bad" not in runtime.state.cache.am.configs
    r = _load(runtime, "../x", "pack/first")
    assert r.status == 400 and "no paths" in r.json()["error"]["message"]
    got = runtime.client().completions.create(
        model="tiny-llama", prompt="abc", max_tokens=4, temperature=0
    )
    assert got.choices[0].text == reference_text(reference, "abc", None, 4)


def test_a_malformed_root_adapter_fails_its_request(served):
    with pytest.raises(openai.BadRequestError, match="adapter 'broken'") as e:
        served.client().completions.create(model="broken", prompt="a", max_tokens=2)
    assert e.value.body["code"] == "invalid_adapter"
    assert served.client().completions.create(model="lora", prompt="a", max_tokens=2).choices


def test_prompt_and_prefix_tuning_adapters_are_served(tiny_base, tmp_path):
    """Prompt tuning and prefix tuning folders, served next to each other and the base in
    one batch (concurrent requests): each answer equals offline generation with it."""
    from concurrent.futures import ThreadPoolExecutor

    from http_setup import load_base, write_adapter

    from splice.adapters import AdapterModel, load_adapter

    root = tmp_path / "adapters"
    write_adapter(tiny_base, root / "pt", "prompt_tuning", {"num_virtual_tokens": 3}, 21)
    write_adapter(tiny_base, root / "pf", "prefix_tuning", {"num_virtual_tokens": 2}, 22)
    am = AdapterModel(load_base(tiny_base))
    for name in ("pt", "pf"):
        load_adapter(am, root / name, name, activate=False)
    am.eval()
    models = ["pt", "pf", "tiny-llama", "pt", "pf"]
    want = [reference_text(am, "hello world", None if m == "tiny-llama" else m, 8) for m in models]
    assert len(set(want)) == 3  # the adapters change the answer
    with serve(tiny_base, adapter_roots=[str(root)]) as running:

        def complete(model):
            answer = running.client().completions.create(
                model=model, prompt="hello world", max_tokens=8, temperature=0
            )
            return answer.choices[0].text

        with ThreadPoolExecutor(len(models)) as pool:
            assert list(pool.map(complete, models)) == want


def test_a_named_composition_is_served_as_its_weighted_set(tiny_base, adapter_root, reference):
    """compositions: {mix: {average: {lora: 3, ia3: 1}}} answers as the mixed batch's
    weighted set {lora: 0.75, ia3: 0.25}, in one batch with its own adapters and the base."""
    from concurrent.futures import ThreadPoolExecutor

    mix = {"lora": 0.75, "ia3": 0.25}
    models = ["mix", "lora", "tiny-llama", "mix", "ia3"]
    offline = {"mix": mix, "tiny-llama": None}
    want = [reference_text(reference, "hello world", offline.get(m, m), 8) for m in models]
    assert want[0] not in (want[1], want[2])  # the composition answers unlike lora and the base
    compositions = {"mix": {"average": {"lora": 3, "ia3": 1}}}
    with serve(tiny_base, adapter_roots=[str(adapter_root)], compositions=compositions) as running:
        assert "mix" in {m.id for m in running.client().models.list().data}

        def complete(model):
            answer = running.client().completions.create(
                model=model, prompt="hello world", max_tokens=8, temperature=0
            )
            return answer.choices[0].text

        with ThreadPoolExecutor(len(models)) as pool:
            assert list(pool.map(complete, models)) == want
        time.sleep(0.2)  # holds end with the requests' final events
        assert {n: e.users for n, e in running.state.cache.loaded.items()} == {"lora": 0, "ia3": 0}
