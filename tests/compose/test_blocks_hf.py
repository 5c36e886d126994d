"""Composition blocks on a tiny HF Llama: Parallel's per-adapter outputs, generation with a
layer-level block, and a fusion saved and loaded back."""

from __future__ import annotations

import json

import pytest
import torch

from splice.adapters import AdapterModel, make_config
from splice.compose import (
    Average,
    CompositionError,
    Fuse,
    Parallel,
    Stack,
    load_fusion,
    save_fusion,
)
from tiny_hf import tiny_llama

IDS = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def _randomize(params, seed: int, scale: float = 0.3) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.copy_(torch.randn(p.shape, generator=g) * scale)


def llama_with_adapters() -> AdapterModel:
    am = AdapterModel(tiny_llama().eval())
    for i, name in enumerate(["a", "b"]):
        am.add_adapter(name, make_config("bottleneck", {"placement": "houlsby"}))
        _randomize(am.adapter_parameters(name), i + 1)
    am.add_adapter("l", make_config("lora", {"r": 2, "target_modules": ["q_proj", "v_proj"]}))
    _randomize(am.adapter_parameters("l"), 3)
    return am


@torch.no_grad()
def logits(am, **kw) -> torch.Tensor:
    return am(input_ids=IDS, **kw).logits


def test_parallel_outputs_equal_each_adapter_alone():
    am = llama_with_adapters()
    alone = []
    for name in ["a", "l"]:
        am.set_active(name)
        alone.append(logits(am))
    am.set_active(Parallel("a", "l"))
    with torch.no_grad():
        outs = am(input_ids=IDS, attention_mask=torch.ones_like(IDS), labels=IDS)
    assert len(outs) == 2
    for out, ref in zip(outs, alone, strict=True):
        torch.testing.assert_close(out.logits, ref)
        assert out.loss is None  # the loss of the repeated batch is not split
    assert not torch.allclose(alone[0], alone[1])


def test_generate_with_a_layer_level_block_equals_greedy_forward():
    am = llama_with_adapters()
    am.set_active(Stack("l", Average("a", "b", weights=[0.3, 0.7])))
    with torch.no_grad():
        got = am.generate(input_ids=IDS, max_new_tokens=4, do_sample=False, pad_token_id=0)
        ids = IDS
        for _ in range(4):  # greedy without a KV cache
            nxt = am(input_ids=ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
    assert torch.equal(got, ids)


def test_fusion_save_and_load_round_trip(tmp_path):
    am = llama_with_adapters()
    am.add_fusion(Fuse("a", "b", name="fab"), {"regularization": 0.02})
    _randomize(am.fusions["fab"].parameters(), 9, scale=0.1)
    am.set_active(Fuse(name="fab"))
    expected = logits(am)
    am.set_active("a")
    assert not torch.allclose(logits(am), expected)

    out = save_fusion(am, tmp_path / "fusion", "fab")
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert files == [
        "adapters/a/adapter_config.json",
        "adapters/a/adapter_model.safetensors",
        "adapters/b/adapter_config.json",
        "adapters/b/adapter_model.safetensors",
        "fusion.safetensors",
        "fusion_config.json",
        "splice_output.json",  # OutputFolder's marker
    ]
    meta = json.loads((out / "fusion_config.json").read_text())
    assert meta["composition"] == {"fuse": {"name": "fab", "adapters": ["a", "b"]}}
    assert meta["config"]["regularization"] == 0.02
    assert len(meta["layers"]) == 4  # houlsby: o_proj and down_proj in 2 layers

    fresh = AdapterModel(tiny_llama().eval())
    block = load_fusion(fresh, out)
    assert block == Fuse("a", "b", name="fab")
    torch.testing.assert_close(logits(fresh), expected)
    assert not any(p.requires_grad for n in "ab" for p in fresh.adapter_parameters(n))
    with pytest.raises(CompositionError, match=r"already has an adapter named 'a'"):
        load_fusion(fresh, out)
    # the model's own adapters instead of the copies
    again = AdapterModel(tiny_llama().eval())
    with pytest.raises(CompositionError, match=r"no adapter named 'a'"):
        load_fusion(again, out, load_adapters=False)
    assert len(again.fusions) == 0


def test_loading_a_fusion_for_another_model_fails_cleanly(tmp_path):
    am = llama_with_adapters()
    am.add_fusion(Fuse("a", "b", name="fab"))
    out = save_fusion(am, tmp_path / "fusion", "fab")
    other = AdapterModel(tiny_llama(hidden_size=16, intermediate_size=32).eval())
    with pytest.raises(Exception, match=r"shape"):
        load_fusion(other, out)
    assert not other.configs and len(other.fusions) == 0  # nothing half-loaded
    with pytest.raises(CompositionError, match=r"no fusion_config.json"):
        load_fusion(other, tmp_path)
