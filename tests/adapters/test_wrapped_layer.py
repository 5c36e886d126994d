"""A wrapped layer stands in for its base layer: model code that reads the module's
attributes (ViT reads ``patch_embeddings.projection.weight.dtype``) sees the base's, as with
PEFT's layers. LoRA / DoRA on a ViT including its Conv2d patch embedding match PEFT."""

from __future__ import annotations

import peft
import pytest
import torch
from tiny import FACTORIES, logits, randomize
from torch import nn

from splice.adapters import (
    AdapterModel,
    load_adapter,
    load_adapter_model,
    make_config,
    save_adapter,
)
from tiny_hf import tiny_vit

PIXELS = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
TARGETS = ["projection", "q_proj", "v_proj"]


@torch.no_grad()
def _logits(model) -> torch.Tensor:
    return model(pixel_values=PIXELS).logits


def test_wrapper_exposes_the_base_layers_attributes():
    am = AdapterModel(tiny_vit())
    am.add_adapter("a", make_config("lora", {"r": 2, "target_modules": TARGETS}))
    projection = am.model.vit.embeddings.patch_embeddings.projection
    base = projection.base_layer
    assert isinstance(base, nn.Conv2d)
    assert projection.weight is base.weight and projection.bias is base.bias
    assert (projection.kernel_size, projection.out_channels) == ((4, 4), 16)
    query = am.model.vit.layers[0].attention.q_proj
    assert (query.in_features, query.out_features) == (16, 16)
    assert query.active == ["a"]  # the wrapper's own attributes come first
    with pytest.raises(AttributeError):
        _ = query.no_such_attribute


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_vit_with_patch_embedding_matches_peft_both_ways(dora, tmp_path):
    base_logits = _logits(tiny_vit())
    pm = peft.get_peft_model(
        tiny_vit(), peft.LoraConfig(r=2, target_modules=TARGETS, use_dora=dora)
    )
    randomize([p for p in pm.parameters() if p.requires_grad])
    want = _logits(pm.eval())
    assert (want - base_logits).abs().max() > 1e-3
    pm.save_pretrained(tmp_path / "peft")
    am = load_adapter_model(tiny_vit(), tmp_path / "peft").eval()
    torch.testing.assert_close(_logits(am), want, atol=1e-5, rtol=0)

    am2 = AdapterModel(tiny_vit())
    config = {"r": 2, "target_modules": TARGETS, "use_dora": dora}
    am2.add_adapter("default", make_config("lora", config))
    randomize(am2.adapter_parameters("default"), seed=5)
    want2 = _logits(am2.eval())
    assert (want2 - base_logits).abs().max() > 1e-3
    save_adapter(am2, tmp_path / "splice")
    pm2 = peft.PeftModel.from_pretrained(tiny_vit(), tmp_path / "splice").eval()
    torch.testing.assert_close(_logits(pm2), want2, atol=1e-5, rtol=0)
    am2.fold("default")  # the folded patch embedding gives the same logits
    torch.testing.assert_close(_logits(am2), want2, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ["hra", "oft"])
def test_several_input_transforms_forward_equals_fold_and_peft_merge(method, tmp_path):
    """Two active input transforms on one layer: W M_1 M_2 in the forward, as folding one
    after the other gives, and as PEFT's merge (and PEFT's HRA forward) computes."""

    def config():
        if method == "hra":
            return peft.HRAConfig(r=4, target_modules=["q_proj"], init_weights=False)
        return peft.OFTConfig(r=4, oft_block_size=0, target_modules=["q_proj"], init_weights=False)

    pm = peft.get_peft_model(FACTORIES["llama"](0), config())
    pm.add_adapter("other", config())
    randomize([p for n, p in pm.named_parameters() if "oft_R" in n or "hra_u" in n], scale=0.3)
    pm.base_model.set_adapter(["default", "other"])
    peft_forward = logits(pm.eval())
    pm.save_pretrained(tmp_path)
    peft_merged = logits(pm.merge_and_unload())
    am = load_adapter_model(FACTORIES["llama"](0), tmp_path)
    load_adapter(am, tmp_path / "other", "other")
    am.set_active(["default", "other"])
    forward = logits(am.eval())
    assert (forward - logits(FACTORIES["llama"](0))).abs().max() > 1e-3
    torch.testing.assert_close(forward, peft_merged, atol=1e-5, rtol=0)
    if method == "hra":
        torch.testing.assert_close(forward, peft_forward, atol=1e-5, rtol=0)
    am.fold()
    torch.testing.assert_close(logits(am), forward, atol=1e-5, rtol=0)
