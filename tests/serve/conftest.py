"""Fixtures of the serving tests (helpers in http_setup.py): a tiny base folder, adapter
folders written by splice ("lora", "dora", "ia3" and a malformed "broken"), the same adapters
loaded offline (`reference`), and `served`: one shared open server over them."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from http_setup import ADAPTERS, ATTN, RunningServer, load_base, serve, write_adapter

from splice.adapters import AdapterModel
from tiny_hf import save_tiny_llama_folder


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


@pytest.fixture(scope="session")
def served(tiny_base, adapter_root) -> Iterator[RunningServer]:
    with serve(tiny_base, adapter_roots=[str(adapter_root)], max_loaded=8) as running:
        yield running
