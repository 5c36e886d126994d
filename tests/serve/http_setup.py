"""Helpers of the HTTP serving tests (the fixtures are in conftest.py): adapter folders
written by splice, offline greedy references, and `serve(base, **config)`: a real uvicorn
server on 127.0.0.1 (a free port) in a thread, for a `ServeConfig` of the keys given, yielding
a `RunningServer` (the openai client, plain HTTP calls) and stopped, drained, on exit."""

from __future__ import annotations

import contextlib
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from splice.adapters import AdapterModel, make_config, save_adapter
from tiny_hf import tiny_tokenizer

ATTN, FF = ["q_proj", "v_proj"], ["down_proj"]
ADAPTERS = {  # name -> (method, params, seed)
    "lora": ("lora", {"r": 4, "lora_alpha": 8, "target_modules": ATTN + FF}, 11),
    "dora": ("lora", {"r": 2, "use_dora": True, "target_modules": ATTN + FF}, 12),
    "ia3": ("ia3", {"target_modules": ATTN + FF, "feedforward_modules": FF}, 13),
}


def load_base(folder: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@torch.no_grad()
def write_adapter(base_folder: Path, out: Path, method: str, params: dict, seed: int) -> Path:
    """A PEFT adapter folder for the tiny base with random (non-zero) values."""
    am = AdapterModel(load_base(base_folder))
    am.add_adapter("x", make_config(method, params))
    g = torch.Generator().manual_seed(seed)
    for p in am.adapter_parameters("x"):
        p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    save_adapter(am, out, "x")
    return out


@torch.no_grad()
def reference_ids(am: AdapterModel, ids: list[int], adapter: str | None, max_tokens: int) -> str:
    """Greedy ``am.generate`` of the prompt ``ids`` alone with ``adapter``, decoded (EOS
    ends it): what the server must answer with temperature 0."""
    out = am.generate(
        torch.tensor([ids]),
        adapter_names=[adapter or "__base__"],
        do_sample=False,
        max_new_tokens=max_tokens,
        pad_token_id=0,
        eos_token_id=2,
    )
    new = out[0, len(ids) :].tolist()
    if 2 in new:
        new = new[: new.index(2)]
    return tiny_tokenizer().decode(new, skip_special_tokens=True)


def reference_text(am: AdapterModel, prompt: str, adapter: str | None, max_tokens: int) -> str:
    return reference_ids(am, tiny_tokenizer()(prompt)["input_ids"], adapter, max_tokens)


def reference_chat(am: AdapterModel, messages: list[dict], adapter: str | None, n: int) -> str:
    tok = tiny_tokenizer()
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return reference_ids(am, tok(text, add_special_tokens=False)["input_ids"], adapter, n)


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    text: str

    def json(self) -> Any:
        return json.loads(self.text)


@dataclass
class RunningServer:
    url: str  # http://127.0.0.1:PORT
    state: Any
    server: Any
    thread: threading.Thread

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def client(self, key: str = "none", **kw: Any) -> Any:
        import openai

        return openai.OpenAI(base_url=self.base_url, api_key=key, max_retries=0, timeout=60, **kw)

    def post(self, path: str, body: Any, key: str | None = None) -> Reply:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        return self.request("POST", path, data, key)

    def get(self, path: str, key: str | None = None) -> Reply:
        return self.request("GET", path, None, key)

    def request(self, method: str, path: str, data: bytes | None, key: str | None) -> Reply:
        """A plain HTTP call (urllib): the status, headers and body, errors included."""
        headers = {"Content-Type": "application/json"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        req = urllib.request.Request(self.url + path, data, headers, method=method)
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return Reply(r.status, dict(r.headers), r.read().decode())
        except urllib.error.HTTPError as e:
            return Reply(e.code, dict(e.headers), e.read().decode())

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(60)


@contextlib.contextmanager
def serve(tiny_base: Path, **config: Any) -> Iterator[RunningServer]:
    """A real server for ``config`` (ServeConfig keys), stopped (drained) on exit."""
    from splice.serve.config import ServeConfig
    from splice.serve.server import bound_socket, build_state, uvicorn_server

    settings = ServeConfig(**{"base": str(tiny_base), "port": 0, **config})
    sock = bound_socket("127.0.0.1", 0)
    state = build_state(settings)
    server = uvicorn_server(state, settings, log_level="warning")
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    running = RunningServer(f"http://127.0.0.1:{sock.getsockname()[1]}", state, server, thread)
    try:
        yield running
    finally:
        running.stop()
        sock.close()
