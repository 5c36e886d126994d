"""LoraFoldedReader against PEFT's own merge_and_unload(), tensor by tensor."""

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from splice.errors import CheckpointError
from splice.io import SafetensorsReader
from splice.peft import LoraFoldedReader
from splice.reference import open_checkpoint
from tiny_hf import tiny_llama

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def _llama(seed=0, **overrides):
    return tiny_llama(seed, **overrides)


def _gpt2(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=32)
    return transformers.GPT2LMHeadModel(cfg)


def _randomize_adapter(pm, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.copy_(torch.randn(p.shape, generator=g).to(p.dtype) * 0.1)


def _build(tmp_path, make_model, lora_config, dtype=torch.float32, tweak=None, safe=True):
    """Save a base and a trained-looking adapter; return (base_dir, adapter_dir)."""
    base_dir, ad_dir = tmp_path / "base", tmp_path / "adapter"
    model = make_model().to(dtype)
    model.save_pretrained(base_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(model, lora_config)
        _randomize_adapter(pm)
        if tweak is not None:
            tweak(pm)
        pm.save_pretrained(ad_dir, safe_serialization=safe)
    return base_dir, ad_dir


def _reference(base_dir, ad_dir, model_cls, dtype=torch.float32):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = model_cls.from_pretrained(base_dir, dtype=dtype)
        merged = peft.PeftModel.from_pretrained(base, ad_dir).merge_and_unload()
    return {k: v.detach() for k, v in merged.state_dict().items()}


def _compare(reader, ref, exact=True, rename=lambda n: n):
    names = reader.names()
    assert {rename(n) for n in names} <= set(ref)
    changed = 0
    for name in names:
        got, want = reader.read(name), ref[rename(name)]
        assert got.dtype == want.dtype and got.shape == want.shape, name
        if exact:
            assert torch.equal(got, want), name
        else:
            torch.testing.assert_close(got.float(), want.float(), atol=1e-6, rtol=0, msg=name)
        changed += reader.is_modified(name)
    return changed


def test_plain_lora_matches_peft(tmp_path):
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    base_dir, ad_dir = _build(tmp_path, _llama, cfg)
    reader = open_checkpoint(f"{base_dir}+{ad_dir}")
    ref = _reference(base_dir, ad_dir, transformers.LlamaForCausalLM)
    assert _compare(reader, ref) == 4  # q and v of 2 layers
    # and it really changed something
    base = SafetensorsReader(base_dir / "model.safetensors")
    name = "model.layers.1.self_attn.v_proj.weight"
    assert not torch.allclose(base.read(name), reader.read(name))


def test_rank_alpha_pattern_and_rslora_match_peft(tmp_path):
    cfg = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "o_proj", "down_proj"],
        rank_pattern={"model.layers.0.self_attn.q_proj": 2, "o_proj": 6},
        alpha_pattern={"v_proj": 3, r"layers\.1\.mlp\.down_proj": 20},
        use_rslora=True,
    )
    base_dir, ad_dir = _build(tmp_path, _llama, cfg)
    reader = LoraFoldedReader(SafetensorsReader(base_dir / "model.safetensors"), ad_dir)
    assert reader.config.rank_for("model.layers.0.self_attn.q_proj") == 2
    assert reader.config.rank_for("model.layers.1.self_attn.q_proj") == 4
    assert reader.config.alpha_for("model.layers.1.mlp.down_proj") == 20
    assert reader.config.scale_for("model.layers.0.self_attn.o_proj") == pytest.approx(8 / 6**0.5)
    ref = _reference(base_dir, ad_dir, transformers.LlamaForCausalLM)
    assert _compare(reader, ref) == 8


def test_regex_target_modules_match_peft(tmp_path):
    cfg = peft.LoraConfig(r=3, lora_alpha=5, target_modules=r".*\.layers\.1\..*(k_proj|up_proj)")
    base_dir, ad_dir = _build(tmp_path, _llama, cfg)
    reader = open_checkpoint(f"{base_dir}+{ad_dir}")
    ref = _reference(base_dir, ad_dir, transformers.LlamaForCausalLM)
    assert _compare(reader, ref) == 2


def test_embedding_lora_modules_to_save_and_saved_base_layer(tmp_path):
    def tweak(pm):
        # a resized-vocabulary style change of the embedding's base layer, saved with the adapter
        emb = pm.base_model.model.model.embed_tokens.base_layer.weight
        with torch.no_grad():
            emb.add_(0.5)

    cfg = peft.LoraConfig(
        r=4, lora_alpha=16, target_modules=["embed_tokens", "q_proj"], modules_to_save=["lm_head"]
    )
    base_dir, ad_dir = _build(tmp_path, _llama, cfg, tweak=tweak)
    reader = open_checkpoint(f"{base_dir}+{ad_dir}")
    ref = _reference(base_dir, ad_dir, transformers.LlamaForCausalLM)
    assert _compare(reader, ref) == 4  # embed (replaced + folded), 2 q_proj, lm_head
    assert reader.is_modified("lm_head.weight")


def test_lora_bias_matches_peft(tmp_path):
    cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], lora_bias=True)
    base_dir, ad_dir = _build(tmp_path, lambda: _llama(attention_bias=True), cfg)
    reader = open_checkpoint(f"{base_dir}+{ad_dir}")
    ref = _reference(base_dir, ad_dir, transformers.LlamaForCausalLM)
    assert _compare(reader, ref) == 4  # 2 weights + 2 biases


def test_adapter_bin_format(tmp_path):
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    base_dir, ad_dir = _build(tmp_path, _llama, cfg, safe=False)
    assert (ad_dir / "adapter_model.bin").exists()
    reader = open_checkpoint(f"{base_dir}+{ad_dir}")
    ref = _reference(base_dir, ad_dir, transformers.LlamaForCausalLM)
    assert _compare(reader, ref) == 4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_base_matches_peft(tmp_path, dtype):
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    base_dir, ad_dir = _build(tmp_path, _llama, cfg, dtype=dtype)
    reader = open_checkpoint(f"{base_dir}+{ad_dir}")
    assert reader.info("model.layers.0.self_attn.q_proj.weight").dtype == dtype
    ref = _reference(base_dir, ad_dir, transformers.LlamaForCausalLM, dtype=dtype)
    assert _compare(reader, ref) == 4


def test_bf16_adapter_file_on_bf16_base_matches_peft(tmp_path):
    """Adapter weights stored in bf16: PEFT upcasts them to float32 at load, as we do."""
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    base_dir, ad_dir = _build(tmp_path, _llama, cfg, dtype=torch.bfloat16)
    path = ad_dir / "adapter_model.safetensors"
    tensors = {k: v.to(torch.bfloat16) for k, v in load_file(str(path)).items()}
    save_file(tensors, str(path))
    reader = open_checkpoint(f"{base_dir}+{ad_dir}")
    ref = _reference(base_dir, ad_dir, transformers.LlamaForCausalLM, dtype=torch.bfloat16)
    assert _compare(reader, ref) == 4


def test_gpt2_conv1d_fan_in_fan_out_matches_peft(tmp_path):
    cfg = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True
    )
    base_dir, ad_dir = _build(tmp_path, _gpt2, cfg)
    reader = open_checkpoint(f"{base_dir}+{ad_dir}")
    ref = _reference(base_dir, ad_dir, transformers.GPT2LMHeadModel)
    # attn.c_proj and mlp.c_proj both match "c_proj": 3 modules per layer
    assert _compare(reader, ref) == 6


def test_base_without_model_prefix(tmp_path):
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    base_dir, ad_dir = _build(tmp_path, _llama, cfg)
    full = SafetensorsReader(base_dir / "model.safetensors")
    stripped = {n.removeprefix("model."): full.read(n) for n in full.names()}
    bare = tmp_path / "bare.safetensors"
    save_file(stripped, bare)
    reader = open_checkpoint(f"{bare}+{ad_dir}")
    ref = _reference(base_dir, ad_dir, transformers.LlamaForCausalLM)
    prefixed = {n for n in full.names() if n.startswith("model.")}

    def rename(n):
        return "model." + n if "model." + n in prefixed else n

    assert _compare(reader, ref, rename=rename) == 4


# --- refusals ---------------------------------------------------------------------------


def _tiny_base(tmp_path, **tensors):
    base = tmp_path / "base.safetensors"
    save_file(tensors or {"m.q.weight": torch.zeros(3, 2), "m.k.weight": torch.zeros(3, 2)}, base)
    return SafetensorsReader(base)


def _adapter(tmp_path, config=None, tensors=None):
    ad = tmp_path / "ad"
    ad.mkdir(exist_ok=True)
    cfg = {"peft_type": "LORA", "r": 1, "lora_alpha": 2, "target_modules": ["q", "k"]}
    cfg.update(config or {})
    (ad / "adapter_config.json").write_text(json.dumps(cfg))
    if tensors is None:
        tensors = {
            "base_model.model.m.q.lora_A.weight": torch.ones(1, 2),
            "base_model.model.m.q.lora_B.weight": torch.ones(3, 1),
        }
    save_file(tensors, ad / "adapter_model.safetensors")
    return ad


def test_hand_computed_fold(tmp_path):
    a = torch.tensor([[1.0, 2.0]])
    b = torch.tensor([[1.0], [0.0], [-1.0]])
    ad = _adapter(
        tmp_path,
        tensors={
            "base_model.model.m.q.lora_A.weight": a,
            "base_model.model.m.q.lora_B.weight": b,
        },
    )
    base = _tiny_base(tmp_path, **{"m.q.weight": torch.ones(3, 2)})
    r = LoraFoldedReader(base, ad)
    expected = torch.ones(3, 2) + 2.0 * torch.tensor([[1.0, 2.0], [0.0, 0.0], [-1.0, -2.0]])
    assert torch.equal(r.read("m.q.weight"), expected)


def test_adapter_folder_without_config(tmp_path):
    (tmp_path / "ad").mkdir()
    with pytest.raises(CheckpointError, match=r"ad: no adapter_config\.json; not a PEFT adapter"):
        LoraFoldedReader(_tiny_base(tmp_path), tmp_path / "ad")


def test_missing_adapter_folder(tmp_path):
    with pytest.raises(CheckpointError, match=r"adapter folder .*nope does not exist"):
        LoraFoldedReader(_tiny_base(tmp_path), tmp_path / "nope")


def test_unsupported_peft_type(tmp_path):
    ad = _adapter(tmp_path, {"peft_type": "IA3"})
    with pytest.raises(
        CheckpointError, match="peft_type is 'IA3'; only LORA adapters can be folded"
    ):
        LoraFoldedReader(_tiny_base(tmp_path), ad)


def test_dora_hand_computed_fold(tmp_path):
    ad = _adapter(
        tmp_path,
        {"use_dora": True, "target_modules": ["q"]},
        tensors={
            "base_model.model.m.q.lora_A.weight": torch.tensor([[1.0, 1.0]]),
            "base_model.model.m.q.lora_B.weight": torch.tensor([[1.0], [0.0]]),
            "base_model.model.m.q.lora_magnitude_vector": torch.tensor([1.0, 3.0]),
        },
    )
    base = _tiny_base(tmp_path, **{"m.q.weight": torch.tensor([[1.0, 0.0], [0.0, 2.0]])})
    # s = 2/1; W + sBA = [[3,2],[0,2]]; row norms [√13, 2]; m = [1, 3]
    # W' = [[3/√13, 2/√13], [0, 3]]
    r13 = 13**0.5
    got = LoraFoldedReader(base, ad).read("m.q.weight")
    torch.testing.assert_close(got, torch.tensor([[3 / r13, 2 / r13], [0.0, 3.0]]))


def test_dora_matches_peft(tmp_path):
    cfg = peft.LoraConfig(
        r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "v_proj", "embed_tokens"]
    )
    base_dir, ad_dir = _build(tmp_path, _llama, cfg)
    reader = open_checkpoint(f"{base_dir}+{ad_dir}")
    ref = _reference(base_dir, ad_dir, transformers.LlamaForCausalLM)
    assert _compare(reader, ref, exact=False) == 5  # 2 q, 2 v, the embedding


def test_dora_gpt2_conv1d_matches_peft(tmp_path):
    cfg = peft.LoraConfig(
        r=4, lora_alpha=8, use_dora=True, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True
    )
    base_dir, ad_dir = _build(tmp_path, _gpt2, cfg)
    reader = open_checkpoint(f"{base_dir}+{ad_dir}")
    ref = _reference(base_dir, ad_dir, transformers.GPT2LMHeadModel)
    assert _compare(reader, ref, exact=False) == 4


def test_dora_magnitude_without_use_dora(tmp_path):
    ad = _adapter(
        tmp_path,
        tensors={
            "base_model.model.m.q.lora_A.weight": torch.ones(1, 2),
            "base_model.model.m.q.lora_B.weight": torch.ones(3, 1),
            "base_model.model.m.q.lora_magnitude_vector": torch.ones(3),
        },
    )
    with pytest.raises(CheckpointError, match="DoRA magnitude vector but the config"):
        LoraFoldedReader(_tiny_base(tmp_path), ad)


def test_dora_missing_magnitude(tmp_path):
    ad = _adapter(tmp_path, {"use_dora": True})
    with pytest.raises(CheckpointError, match=r"use_dora is set but module 'm\.q' has no"):
        LoraFoldedReader(_tiny_base(tmp_path), ad)


def test_dora_magnitude_shape(tmp_path):
    ad = _adapter(
        tmp_path,
        {"use_dora": True},
        tensors={
            "base_model.model.m.q.lora_A.weight": torch.ones(1, 2),
            "base_model.model.m.q.lora_B.weight": torch.ones(3, 1),
            "base_model.model.m.q.lora_magnitude_vector": torch.ones(2),
        },
    )
    with pytest.raises(CheckpointError, match=r"DoRA magnitude of shape \[2\], expected \[3\]"):
        LoraFoldedReader(_tiny_base(tmp_path), ad)


def test_key_matching_no_base_module(tmp_path):
    ad = _adapter(
        tmp_path,
        {"target_modules": ["q", "zz"]},
        tensors={
            "base_model.model.m.zz.lora_A.weight": torch.ones(1, 2),
            "base_model.model.m.zz.lora_B.weight": torch.ones(3, 1),
        },
    )
    with pytest.raises(
        CheckpointError, match=r"key '.*m\.zz\.lora_A\.weight' matches no tensor of the base"
    ):
        LoraFoldedReader(_tiny_base(tmp_path), ad)


def test_full_tensor_matching_no_base(tmp_path):
    ad = _adapter(tmp_path, tensors={"base_model.model.other.weight": torch.ones(2)})
    with pytest.raises(CheckpointError, match="matches no tensor of the base"):
        LoraFoldedReader(_tiny_base(tmp_path), ad)


def test_lora_shape_mismatch(tmp_path):
    ad = _adapter(
        tmp_path,
        tensors={
            "base_model.model.m.q.lora_A.weight": torch.ones(1, 5),
            "base_model.model.m.q.lora_B.weight": torch.ones(3, 1),
        },
    )
    with pytest.raises(
        CheckpointError,
        match=r"shape mismatch for base tensor 'm\.q\.weight'.*\[3, 5\], the base has \[3, 2\]",
    ):
        LoraFoldedReader(_tiny_base(tmp_path), ad)


def test_transposed_shape_hints_fan_in_fan_out(tmp_path):
    ad = _adapter(tmp_path, {"fan_in_fan_out": True})
    with pytest.raises(CheckpointError, match="fan_in_fan_out"):
        LoraFoldedReader(_tiny_base(tmp_path), ad)


def test_rank_differs_from_config(tmp_path):
    ad = _adapter(tmp_path, {"r": 2})
    with pytest.raises(CheckpointError, match="configured rank r=2"):
        LoraFoldedReader(_tiny_base(tmp_path), ad)


def test_module_outside_target_modules(tmp_path):
    ad = _adapter(tmp_path, {"target_modules": ["k"]})
    with pytest.raises(CheckpointError, match=r"module 'm.q', which the adapter's target_modules"):
        LoraFoldedReader(_tiny_base(tmp_path), ad)


def test_half_a_lora_pair(tmp_path):
    ad = _adapter(tmp_path, tensors={"base_model.model.m.q.lora_A.weight": torch.ones(1, 2)})
    with pytest.raises(CheckpointError, match=r"module 'm.q' has no lora_B weight"):
        LoraFoldedReader(_tiny_base(tmp_path), ad)


def test_unknown_lora_key(tmp_path):
    ad = _adapter(tmp_path, tensors={"base_model.model.m.q.lora_E": torch.ones(3)})
    with pytest.raises(CheckpointError, match="not a plain LoRA key"):
        LoraFoldedReader(_tiny_base(tmp_path), ad)


def test_missing_weights_file(tmp_path):
    ad = _adapter(tmp_path)
    (ad / "adapter_model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no adapter_model.safetensors or adapter_model.bin"):
        LoraFoldedReader(_tiny_base(tmp_path), ad)
