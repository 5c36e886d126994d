"""The OpenAI-compatible endpoints over real HTTP with the official `openai` client (and one
`curl`): answers equal offline greedy generation with the selected adapter, streamed or not,
alone or batched with requests for other adapters."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from http_setup import ADAPTERS, reference_chat, reference_ids, reference_text

MODELS = ["tiny-llama", *ADAPTERS]  # the base's id is its folder's name


@pytest.mark.parametrize("model", MODELS)
def test_completion_equals_offline_greedy(served, reference, model):
    client = served.client()
    r = client.completions.create(model=model, prompt="hello there", max_tokens=12, temperature=0)
    adapter = None if model == "tiny-llama" else model
    assert r.choices[0].text == reference_text(reference, "hello there", adapter, 12)
    assert r.object == "text_completion" and r.model == model
    assert r.usage.prompt_tokens == len("hello there")  # one token per character
    if r.choices[0].finish_reason == "length":
        assert r.usage.completion_tokens == 12
    else:  # EOS: counted, not shown
        assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens <= 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_adapters_change_the_answer(served, reference):
    texts = {
        m: reference_text(reference, "abc", None if m == "tiny-llama" else m, 12) for m in MODELS
    }
    assert len(set(texts.values())) == len(MODELS)  # else adapter selection would be untested


def test_chat_uses_the_template_and_streams_the_same_text(served, reference):
    client = served.client()
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    want = reference_chat(reference, messages, "lora", 10)
    r = client.chat.completions.create(
        model="lora", messages=messages, max_tokens=10, temperature=0
    )
    assert r.choices[0].message.content == want and r.choices[0].message.role == "assistant"
    assert r.object == "chat.completion"
    prompt_len = len("system: be brief\nuser: hi\nassistant:")
    assert r.usage.prompt_tokens == prompt_len
    chunks = list(
        client.chat.completions.create(
            model="lora",
            messages=messages,
            max_tokens=10,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want
    finals = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finals == [r.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == prompt_len
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens


def test_completion_stream_and_raw_sse_shape(served, reference):
    want = reference_text(reference, "xyz", "ia3", 8)
    chunks = list(
        served.client().completions.create(
            model="ia3", prompt="xyz", max_tokens=8, temperature=0, stream=True
        )
    )
    assert "".join(c.choices[0].text for c in chunks) == want
    raw = served.post(
        "/v1/completions",
        {"model": "ia3", "prompt": "xyz", "max_tokens": 3, "temperature": 0, "stream": True},
    )
    assert raw.status == 200 and raw.headers["content-type"].startswith("text/event-stream")
    events = [e for e in raw.text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    first = json.loads(events[0][len("data: ") :])
    assert first["object"] == "text_completion" and first["choices"][0]["index"] == 0


def test_token_prompts_several_prompts_and_stop(served, reference):
    client = served.client()
    ids = [10, 11, 12, 13]
    r = client.completions.create(model="dora", prompt=ids, max_tokens=6, temperature=0)
    assert r.choices[0].text == reference_ids(reference, ids, "dora", 6)
    r = client.completions.create(model="dora", prompt=["ab", "cd"], max_tokens=6, temperature=0)
    assert [c.index for c in r.choices] == [0, 1]
    assert [c.text for c in r.choices] == [
        reference_text(reference, p, "dora", 6) for p in ("ab", "cd")
    ]
    full = reference_text(reference, "hello there", "lora", 12)
    stop = full[3:5]
    r = client.completions.create(
        model="lora", prompt="hello there", max_tokens=12, temperature=0, stop=[stop]
    )
    assert r.choices[0].text == full[: full.index(stop)] and r.choices[0].finish_reason == "stop"


def test_seeded_sampling_is_reproducible(served):
    client = served.client()
    kw = dict(model="lora", prompt="abc", max_tokens=10, temperature=1.0, top_p=0.9)
    a = client.completions.create(seed=7, **kw).choices[0].text
    assert client.completions.create(seed=7, **kw).choices[0].text == a


def test_concurrent_requests_for_different_adapters(served, reference):
    """Requests for every adapter at once share decode batches; each answer is its own."""
    jobs = [(m, p) for p in ("one", "two", "three") for m in MODELS]

    def ask(job):
        model, prompt = job
        r = served.client().completions.create(
            model=model, prompt=prompt, max_tokens=16, temperature=0
        )
        return r.choices[0].text

    with ThreadPoolExecutor(len(jobs)) as pool:
        got = list(pool.map(ask, jobs))
    want = [reference_text(reference, p, None if m == "tiny-llama" else m, 16) for m, p in jobs]
    assert got == want


def test_models_lists_base_and_adapters(served):
    data = served.client().models.list().data
    assert data[0].id == "tiny-llama" and getattr(data[0], "parent", None) is None
    adapters = {m.id: m for m in data[1:]}
    assert set(ADAPTERS) <= set(adapters) and "broken" in adapters
    assert all(m.parent == "tiny-llama" and m.object == "model" for m in adapters.values())


def test_bad_requests_are_openai_errors(served):
    client = served.client()
    with pytest.raises(openai.BadRequestError, match="n must be 1"):
        client.completions.create(model="lora", prompt="a", n=2)
    with pytest.raises(openai.NotFoundError, match="does not exist") as e:
        client.completions.create(model="nope", prompt="a")
    assert e.value.body["code"] == "model_not_found"
    r = served.post("/v1/completions", {"model": "lora", "prompt": "a", "logprobs": 2})
    body = r.json()
    assert r.status == 400 and set(body["error"]) == {"message", "type", "param", "code"}
    assert (
        body["error"]["type"] == "invalid_request_error" and "logprobs" in body["error"]["message"]
    )
    r = served.post("/v1/completions", b"{not json")
    assert r.status == 400 and "error" in r.json()
    r = served.post("/v1/completions", {"model": "lora", "prompt": "a", "temperature": -1})
    assert r.status == 400 and "temperature" in r.json()["error"]["message"]
    assert served.get("/nowhere").json()["error"]["type"] == "not_found_error"


@pytest.mark.parametrize("name", ["../lora", "/etc/passwd", "lora/../ia3", ".."])
def test_model_names_are_not_paths(served, name):
    r = served.post("/v1/completions", {"model": name, "prompt": "a", "max_tokens": 1})
    assert r.status == 400 and "no paths" in r.json()["error"]["message"]


def test_health_and_metrics(served):
    assert served.get("/health").text == "ok"
    served.client().completions.create(model="lora", prompt="ab", max_tokens=2, temperature=0)
    text = served.get("/metrics").text
    for name in (
        'splice_requests_total{endpoint="/v1/completions",status="200"}',
        "splice_prompt_tokens_total",
        "splice_generation_tokens_total",
        "splice_time_to_first_token_seconds_count",
        "splice_time_per_output_token_seconds_count",
        "splice_requests_running",
        "splice_requests_waiting",
        "splice_adapters_loaded",
    ):
        assert name in text, name
    loaded = [line for line in text.splitlines() if line.startswith("splice_adapters_loaded ")]
    assert float(loaded[0].split()[1]) == len(served.state.cache.loaded) >= 1


def test_a_client_leaving_a_stream_frees_its_sequence_and_adapter(served):
    import http.client
    import time

    host, port = served.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    before = served.state.engine.stats.tokens_generated
    body = {"model": "dora", "prompt": "abc", "max_tokens": 1000, "temperature": 0, "stream": True}
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    reply = conn.getresponse()
    assert reply.status == 200 and reply.readline().startswith(b"data: ")
    cache, engine = served.state.cache, served.state.engine
    assert cache.loaded["dora"].users == 1
    conn.sock.shutdown(2)  # leave mid-stream
    conn.close()
    deadline = time.monotonic() + 30
    while cache.loaded["dora"].users or engine.stats.running or engine.stats.waiting:
        assert time.monotonic() < deadline, (cache.loaded["dora"].users, engine.stats)
        time.sleep(0.02)
    assert engine.stats.tokens_generated - before < 1000  # cut short (no EOS in 300 greedy)
