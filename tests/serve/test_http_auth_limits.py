"""Bearer keys (401 / 403 / 429 in OpenAI's error shape), request limits (4xx), and a
graceful shutdown that finishes the requests in flight."""

from __future__ import annotations

import json
import threading
import time

import openai
import pytest
from http_setup import reference_text, serve

from splice.serve.api_keys import hash_key


@pytest.fixture(scope="module")
def guarded(tiny_base, adapter_root, tmp_path_factory):
    keys = tmp_path_factory.mktemp("keys") / "keys.yaml"
    keys.write_text(
        f"""keys:
  - name: admin
    sha256: {hash_key("admin-key")}
    admin: true
  - name: limited
    sha256: {hash_key("limited-key")}
    adapters: [lora]
    rate_limit: 3
"""
    )
    with serve(tiny_base, adapter_roots=[str(adapter_root)], api_keys=str(keys)) as running:
        yield running


def _error(reply, status):
    assert reply.status == status, reply.text
    body = reply.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def test_keys(guarded, reference):
    body = {"model": "lora", "prompt": "abc", "max_tokens": 4, "temperature": 0}
    assert _error(guarded.post("/v1/completions", body), 401)["code"] == "invalid_api_key"
    assert _error(guarded.post("/v1/completions", {"bogus": 1}), 401)  # the key comes first
    assert "incorrect" in _error(guarded.post("/v1/completions", body, key="wrong"), 401)["message"]
    with pytest.raises(openai.AuthenticationError):
        guarded.client("wrong").models.list()
    got = guarded.client("admin-key").completions.create(**body)
    assert got.choices[0].text == reference_text(reference, "abc", "lora", 4)
    assert guarded.get("/health").status == 200 and guarded.get("/metrics").status == 200


def test_allowed_models_admin_calls_and_rate_limit(guarded):
    limited = guarded.client("limited-key")
    ids = {m.id for m in limited.models.list().data}  # 1st request of 3
    assert ids == {"tiny-llama", "lora"}
    with pytest.raises(openai.PermissionDeniedError, match="may not use the model 'ia3'"):
        limited.completions.create(model="ia3", prompt="a", max_tokens=1)  # 2nd
    load = {"lora_name": "x", "lora_path": "lora"}
    error = _error(guarded.post("/v1/load_lora_adapter", load, key="limited-key"), 403)  # 3rd
    assert error["type"] == "permission_error"
    reply = guarded.post("/v1/completions", {"model": "lora", "prompt": "a"}, key="limited-key")
    error = _error(reply, 429)
    assert error["code"] == "rate_limit_exceeded" and int(reply.headers["retry-after"]) >= 1
    admin = guarded.post(
        "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "lora"}, "admin-key"
    )
    assert admin.status == 200


def test_request_limits(tiny_base, adapter_root):
    with serve(
        tiny_base,
        adapter_roots=[str(adapter_root)],
        max_tokens=20,
        max_prompt_tokens=30,
        max_batch=2,
    ) as server:
        client = server.client()
        for kwargs, message in [
            ({"max_tokens": 21}, "at most 20"),
            ({"prompt": "a" * 31}, "at most 30"),
            ({"prompt": ["a", "b", "c"]}, "at most 2"),
            ({"prompt": ""}, "no tokens"),
            ({"prompt": [99]}, "not in the vocabulary"),
        ]:
            args = {"model": "lora", "prompt": "abc", "max_tokens": 2, **kwargs}
            with pytest.raises(openai.BadRequestError, match=message):
                client.completions.create(**args)
    context = 2048  # the tiny Llama's max_position_embeddings
    with (
        serve(tiny_base, max_tokens=4096) as server,
        pytest.raises(openai.BadRequestError, match="maximum context length is 2048"),
    ):
        server.client().completions.create(model="tiny-llama", prompt="abc", max_tokens=context - 2)


def test_full_queue_is_429(tiny_base, adapter_root):
    """One sequence decoding (max_batch 1), one waiting (max_queue 1): a third is refused."""
    import http.client

    with serve(tiny_base, adapter_roots=[str(adapter_root)], max_batch=1, max_queue=1) as server:
        host, port = server.url.removeprefix("http://").split(":")
        body = {"model": "dora", "prompt": "abc", "max_tokens": 1000, "temperature": 0}
        engine, streams = server.state.engine, []
        for running, waiting in [(1, 0), (1, 1)]:  # greedy dora loops without EOS
            conn = http.client.HTTPConnection(host, int(port), timeout=60)
            data = json.dumps({**body, "stream": True})
            conn.request("POST", "/v1/completions", data, {"Content-Type": "application/json"})
            streams.append(conn)
            deadline = time.monotonic() + 60
            while (engine.stats.running, engine.stats.waiting) != (running, waiting):
                assert time.monotonic() < deadline, engine.stats
                time.sleep(0.01)
        reply = server.post("/v1/completions", {"model": "tiny-llama", "prompt": "a"})
        assert _error(reply, 429)["code"] == "queue_full"
        for conn in streams:
            conn.close()


def test_shutdown_drains_requests_in_flight(tiny_base, adapter_root, reference):
    with serve(tiny_base, adapter_roots=[str(adapter_root)]) as server:
        results = {}

        def ask():
            stream = server.client().completions.create(
                model="lora", prompt="hello", max_tokens=40, temperature=0, stream=True
            )
            results["text"] = "".join(c.choices[0].text for c in stream)

        thread = threading.Thread(target=ask)
        thread.start()
        deadline = time.monotonic() + 30
        while server.state.metrics.generation_tokens._value.get() < 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        server.stop()  # uvicorn's shutdown: in-flight requests finish, then the engine drains
        thread.join(60)
        assert not server.thread.is_alive()
    assert results["text"] == reference_text(reference, "hello", "lora", 40)
    assert server.state.engine.stats.running == 0
