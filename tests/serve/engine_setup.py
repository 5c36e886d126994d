"""Tiny models with adapters and request helpers for the serving engine's tests."""

from __future__ import annotations

import torch

from splice.adapters import AdapterModel, make_config
from splice.serve.requests import GenerationRequest, SamplingParams, TokenEvent
from tiny_hf import tiny_llama, tiny_qwen2

ATTN, FF = ["q_proj", "v_proj"], ["down_proj"]
ADAPTERS = {  # name -> (method, params): LoRA, DoRA, IA3
    "lora": ("lora", {"r": 4, "lora_alpha": 8, "target_modules": ATTN + FF}),
    "dora": ("lora", {"r": 2, "use_dora": True, "target_modules": ATTN + FF}),
    "ia3": ("ia3", {"target_modules": ATTN + FF, "feedforward_modules": FF}),
}
FACTORIES = {
    "llama": lambda: tiny_llama(0, max_position_embeddings=64).eval(),
    "qwen2": lambda: tiny_qwen2(0),
}


@torch.no_grad()
def randomize(params, seed: int, scale: float = 0.3) -> None:
    """Non-trivial adapter values (LoRA's B = 0 at init would hide a missing adapter)."""
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.copy_(torch.randn(p.shape, generator=g) * scale)


def add_adapter(am: AdapterModel, name: str, kind: str, seed: int) -> None:
    method, params = ADAPTERS[kind]
    am.add_adapter(name, make_config(method, params))
    randomize(am.adapter_parameters(name), seed)


def model_with_adapters(arch: str = "llama") -> AdapterModel:
    """The tiny model with adapters "lora", "dora" and "ia3" (random values)."""
    am = AdapterModel(FACTORIES[arch]()).eval()
    for i, kind in enumerate(ADAPTERS):
        add_adapter(am, kind, kind, seed=11 + i)
    return am


def prompt(length: int, seed: int) -> list[int]:
    """``length`` random ids of ordinary characters (4 … 63: no special token)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, 64, (length,), generator=g).tolist()


def request(rid: str, ids: list[int], adapter: str | None = None, **params) -> GenerationRequest:
    params.setdefault("temperature", 0.0)
    return GenerationRequest(rid, ids, adapter, SamplingParams(**params))


@torch.no_grad()
def generate_alone(am: AdapterModel, ids: list[int], adapter: str | None, n: int) -> list[int]:
    """The greedy tokens of ``am.generate`` for this prompt alone (EOS included, if any)."""
    out = am.generate(
        torch.tensor([ids]),
        adapter_names=[adapter or "__base__"],
        do_sample=False,
        max_new_tokens=n,
        pad_token_id=0,
    )
    return out[0, len(ids) :].tolist()


def drain_events(handle) -> list[TokenEvent]:
    """The events already on a synchronous handle (without blocking)."""
    events = []
    while not handle._sync.empty():
        events.append(handle._sync.get())
    return events


def tokens(events: list[TokenEvent]) -> list[int]:
    return [e.token_id for e in events if e.token_id is not None]


def text(events: list[TokenEvent]) -> str:
    return "".join(e.text for e in events)
