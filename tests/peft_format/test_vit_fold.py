"""`BASE+ADAPTER` on a model whose checkpoint keys differ from its module names: a ViT saved
by transformers ≥ 5 spells ``vit.encoder.layer.0.attention.attention.query`` on disk for the
module ``vit.layers.0.attention.q_proj`` that PEFT adapts. The folded checkpoint, loaded back
with `from_pretrained` (which renames), equals PEFT's ``merge_and_unload``."""

import warnings

import pytest
import torch
from safetensors.torch import save_file

from splice.adapters import AdapterModel, make_config, save_adapter
from splice.errors import CheckpointError
from splice.peft.checkpoint_keys import CheckpointKeys
from splice.reference import open_checkpoint

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def _vit(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.ViTConfig(
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        image_size=8,
        patch_size=4,
        num_labels=3,
    )
    return transformers.ViTForImageClassification(cfg)


def _folded_model(ref, base_dir, out_dir):
    """The folded tensors under their checkpoint names, loaded as transformers loads them."""
    reader = open_checkpoint(ref)
    out_dir.mkdir()
    (out_dir / "config.json").write_bytes((base_dir / "config.json").read_bytes())
    save_file(
        {n: reader.read(n).contiguous() for n in reader.names()}, out_dir / "model.safetensors"
    )
    changed = [n for n in reader.names() if reader.is_modified(n)]
    reader.close()
    return transformers.ViTForImageClassification.from_pretrained(out_dir), changed


def _assert_same_state(model, want):
    got = model.state_dict()
    assert set(got) == set(want)
    for name, value in want.items():
        assert torch.equal(got[name], value), name


@pytest.mark.parametrize("use_dora", [False, True])
def test_vit_lora_fold_matches_peft(tmp_path, use_dora):
    base_dir, ad_dir = tmp_path / "base", tmp_path / "adapter"
    base = _vit()
    base.save_pretrained(base_dir)
    cfg = peft.LoraConfig(
        r=2,
        lora_alpha=4,
        target_modules=["q_proj", "v_proj", "fc1"],
        modules_to_save=["classifier"],
        use_dora=use_dora,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(base, cfg)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, p in pm.named_parameters():
                if "lora_" in name or "modules_to_save" in name:
                    p.add_(torch.randn(p.shape, generator=g) * 0.3)
        pm.save_pretrained(ad_dir)
        loaded = transformers.ViTForImageClassification.from_pretrained(base_dir)
        want = peft.PeftModel.from_pretrained(loaded, ad_dir).merge_and_unload().state_dict()
    model, changed = _folded_model(f"{base_dir}+{ad_dir}", base_dir, tmp_path / "folded")
    # the checkpoint's own (legacy) names were changed: 2 layers × (q, v, fc1) + classifier
    assert "vit.encoder.layer.0.attention.attention.query.weight" in changed
    assert len(changed) == 2 * 3 + 2
    _assert_same_state(model, want)


def test_vit_generic_fold_matches_merge_and_unload(tmp_path):
    """A non-LoRA adapter (LoHa) takes the adapter-model fold path: same key mapping."""
    base_dir = tmp_path / "base"
    _vit().save_pretrained(base_dir)
    am = AdapterModel(_vit())
    am.add_adapter("default", make_config("loha", {"r": 2, "target_modules": ["q_proj"]}))
    with torch.no_grad():
        for p in am.adapter_parameters("default"):
            p.add_(torch.randn_like(p) * 0.2)
    save_adapter(am, tmp_path / "adapter")
    want = am.merge_and_unload().state_dict()
    model, changed = _folded_model(f"{base_dir}+{tmp_path / 'adapter'}", base_dir, tmp_path / "f")
    assert changed == [  # the adapted layers' parameters, under the checkpoint's names
        f"vit.encoder.layer.{i}.attention.attention.query.{p}"
        for i in (0, 1)
        for p in ("bias", "weight")
    ]
    got = model.state_dict()
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, atol=1e-6, rtol=1e-6)


def test_checkpoint_keys_rename_as_transformers_loads(tmp_path):
    base_dir = tmp_path / "base"
    _vit().save_pretrained(base_dir)
    disk = "vit.encoder.layer.1.intermediate.dense.weight"
    keys = CheckpointKeys.of([disk, "classifier.weight"], base_dir)
    assert keys.resolve("vit.layers.1.mlp.fc1.weight") == disk
    assert keys.resolve("layers.1.mlp.fc1.weight") == disk  # a base saved without `vit.`
    assert keys.resolve("classifier.weight") == "classifier.weight"
    # without a config.json the names are taken as they are
    plain = CheckpointKeys.of([disk], None)
    assert plain.resolve("vit.layers.1.mlp.fc1.weight") is None
    assert plain.resolve(disk) == disk


def test_converted_tensor_is_refused():
    keys = CheckpointKeys({"model.experts.gate_up_proj": "", "a.weight": "a.weight"})
    with pytest.raises(CheckpointError, match="several checkpoint tensors"):
        keys.resolve("model.experts.gate_up_proj")
