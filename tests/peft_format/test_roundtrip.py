"""PEFT LoRA folders, both directions: a folder PEFT wrote reads as the typed deltas PEFT's
layers compute, and a folder splice writes loads in PEFT with the same ΔW."""

import warnings

import pytest
import torch

from splice.delta import Folded, LowRank, apply_delta
from splice.errors import MergeValidationError
from splice.peft import LoraFolder, read_lora_adapter, write_lora_adapter
from tiny_hf import tiny_llama

peft = pytest.importorskip("peft")


def _peft_adapter(path, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(tiny_llama(0), peft.LoraConfig(**kwargs))
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for name, p in pm.named_parameters():
                if "lora_" in name:
                    p.add_(torch.randn(p.shape, generator=g) * 0.2)
        pm.save_pretrained(path)
    return pm


def _layers(pm):
    return {
        name.removeprefix("base_model.model."): m
        for name, m in pm.named_modules()
        if hasattr(m, "get_delta_weight") and hasattr(m, "base_layer")
    }


def test_peft_folder_reads_as_peft_deltas(tmp_path):
    pm = _peft_adapter(
        tmp_path / "ad",
        r=4,
        lora_alpha=8,
        use_rslora=True,
        target_modules=["q_proj", "down_proj", "embed_tokens"],
        rank_pattern={"down_proj": 2},
        alpha_pattern={"q_proj": 3},
    )
    folder = LoraFolder.open(tmp_path / "ad")
    try:
        layers = _layers(pm)
        assert set(folder.modules) == set(layers) and len(layers) == 5
        for module, layer in layers.items():
            delta = folder.delta(module)
            assert isinstance(delta, LowRank)
            assert delta.transposed == (module == "model.embed_tokens")
            want = layer.get_delta_weight("default")
            assert torch.equal(delta.to_dense(), want), module
    finally:
        folder.close()


def test_peft_dora_folder_reads_as_folded_dora(tmp_path):
    pm = _peft_adapter(tmp_path / "ad", r=2, lora_alpha=4, target_modules=["v_proj"], use_dora=True)
    folder = LoraFolder.open(tmp_path / "ad")
    try:
        for module, layer in _layers(pm).items():
            delta = folder.delta(module)
            assert isinstance(delta, Folded) and delta.transform == "dora"
            weight = layer.base_layer.weight.detach().clone()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                layer.merge()
            assert torch.equal(apply_delta(weight, delta), layer.base_layer.weight), module
            layer.unmerge()
    finally:
        folder.close()
    with pytest.raises(MergeValidationError, match="DoRA"):
        read_lora_adapter(tmp_path / "ad")


def test_written_folder_loads_in_peft_with_the_same_delta(tmp_path):
    g = torch.Generator().manual_seed(5)
    modules = {
        "model.layers.0.self_attn.q_proj": LowRank(
            torch.randn(32, 3, generator=g), torch.randn(3, 32, generator=g), 0.5
        ),
        "model.layers.1.mlp.down_proj": LowRank(
            torch.randn(32, 2, generator=g), torch.randn(2, 64, generator=g), 2.0
        ),
        # an embedding (64 × 32): PEFT's lora_embedding_A is r×64, B is 32×r
        "model.embed_tokens": LowRank(
            torch.randn(32, 3, generator=g), torch.randn(3, 64, generator=g), 1.5
        ),
    }
    embedding = {"model.embed_tokens": True}
    template = {"target_modules": sorted(modules), "task_type": "CAUSAL_LM"}
    write_lora_adapter(tmp_path / "out", modules, embedding, template)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(tiny_llama(0), tmp_path / "out")
    layers = _layers(pm)
    assert set(layers) == set(modules)
    for module, f in modules.items():
        want = f.to_dense().T if embedding.get(module) else f.to_dense()
        got = layers[module].get_delta_weight("default")
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    back = read_lora_adapter(tmp_path / "out")
    assert back.embedding == {m: m in embedding for m in modules}
    for module, f in modules.items():
        torch.testing.assert_close(back.modules[module].to_dense(), f.to_dense())
