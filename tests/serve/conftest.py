"""Shared fixtures of the serving tests: a tiny base folder, adapter folders written by
splice, and a real uvicorn server on 127.0.0.1 (a free port) run in a thread.

`serve(tmp_path, **config)` starts a server for a `ServeConfig` built from the keys given
(base defaults to the tiny folder) and yields a `RunningServer`; `served` is one shared
open server (adapters "lora", "dora", "ia3" under an adapter root) for the tests that do not
change its settings. `reference_text` is the offline greedy generation the HTTP answers must
equal.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from splice.adapters import AdapterModel, make_config, save_adapter
from tiny_hf import save_tiny_llama_folder, tiny_tokenizer

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


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    return save_tiny_llama_folder(tmp_path_factory.mktemp("base") / "tiny-llama")


@pytest.fixture(scope="session")
def adapter_root(tmp_path_factory, tiny_base) -> Path:
    """Adapters "lora", "dora", "ia3" and a malformed "broken" (its config names a LoRA
    rank its tensors do not have)."""
    root = tmp_path_factory.mktemp("adapters")
    for name, (method, params, seed) in ADAPTERS.items():
        write_adapter(tiny_base, root / name, method, params, seed)
    broken = write_adapter(tiny_base, root / "broken", "lora", {"r": 4, "target_modules": ATTN}, 5)
    config = json.loads((broken / "adapter_config.json").read_text())
    config["r"] = 8
    (broken / "adapter_config.json").write_text(json.dumps(config))
    return root


@pytest.fixture(scope="session")
def reference(tiny_base, adapter_root) -> AdapterModel:
    """The tiny base with every good adapter, loaded offline."""
    from splice.adapters import load_adapter

    am = AdapterModel(load_base(tiny_base))
    for name in ADAPTERS:
        load_adapter(am, adapter_root / name, name, activate=False)
    return am.eval()


@torch.no_grad()
def reference_text(am: AdapterModel, prompt: str, adapter: str | None, max_tokens: int) -> str:
    """Greedy ``am.generate`` of ``prompt`` alone with ``adapter``, decoded (EOS ends it)."""
    tok = tiny_tokenizer()
    ids = tok(prompt)["input_ids"]
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
    return tok.decode(new)


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

    def post(self, path: str, body: dict, key: str | None = None) -> Any:
        import httpx

        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.post(self.url + path, json=body, headers=headers, timeout=60)

    def get(self, path: str, key: str | None = None) -> Any:
        import httpx

        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.get(self.url + path, headers=headers, timeout=60)

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


@pytest.fixture(scope="session")
def served(tiny_base, adapter_root) -> Iterator[RunningServer]:
    with serve(tiny_base, adapter_roots=[str(adapter_root)], max_loaded=8) as running:
        yield running
