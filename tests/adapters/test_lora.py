"""LoRA: values against the definition, fold/unfold, PEFT parity both ways."""

import math

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft_parity import peft_to_splice, splice_to_peft
from tiny import logits, randomize, tiny_llama
from torch import nn

from splice.adapters import AdapterConfigError, AdapterModel, LoraConfig


def test_linear_update_is_s_B_A_x():
    base = nn.Sequential(nn.Linear(3, 2, bias=True))
    with torch.no_grad():
        base[0].weight.copy_(torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, -1.0]]))
        base[0].bias.copy_(torch.tensor([0.5, -0.5]))
    am = AdapterModel(base)
    am.add_adapter("a", LoraConfig(r=1, lora_alpha=2, target_modules=["0"]))
    lora = am.model[0].adapters["a"]
    with torch.no_grad():
        lora.lora_A.weight.copy_(torch.tensor([[1.0, 1.0, 0.0]]))
        lora.lora_B.weight.copy_(torch.tensor([[1.0], [-2.0]]))
    x = torch.tensor([[1.0, 2.0, 3.0]])
    # base: [1+6+0.5, 2-3-0.5] = [7.5, -1.5]; A x = 3; s = 2/1 = 2; s B A x = [6, -12]
    torch.testing.assert_close(am(x), torch.tensor([[13.5, -13.5]]))
    # ΔW = 2 * [[1],[-2]] @ [[1,1,0]] = [[2,2,0],[-4,-4,0]]
    torch.testing.assert_close(
        am.deltas("a")["0.weight"], torch.tensor([[2.0, 2.0, 0.0], [-4.0, -4.0, 0.0]])
    )


def test_rslora_and_patterns_scaling():
    cfg = LoraConfig(
        r=4,
        lora_alpha=8,
        use_rslora=True,
        rank_pattern={"q_proj": 2},
        alpha_pattern={"layers.1.self_attn.v_proj": 3},
        target_modules=["q_proj", "v_proj"],
    )
    assert cfg.scaling_for("model.layers.0.self_attn.q_proj") == pytest.approx(8 / math.sqrt(2))
    assert cfg.scaling_for("model.layers.1.self_attn.v_proj") == pytest.approx(3 / 2)
    assert cfg.scaling_for("model.layers.0.self_attn.v_proj") == pytest.approx(8 / 2)
    am = AdapterModel(tiny_llama())
    am.add_adapter("a", cfg)
    mods = dict(am.named_adapter_modules("a"))
    assert mods["model.layers.0.self_attn.q_proj"].lora_A.weight.shape == (2, 32)
    assert mods["model.layers.0.self_attn.v_proj"].lora_A.weight.shape == (4, 32)


def test_init_is_identity_and_base_frozen():
    ref = logits(tiny_llama())
    am = AdapterModel(tiny_llama())
    am.add_adapter("a", LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    torch.testing.assert_close(logits(am), ref)
    trainable = {n for n, p in am.named_parameters() if p.requires_grad}
    assert trainable and all(".adapters.a.lora_" in n for n in trainable)
    t, total = am.trainable_parameters()
    # 2 layers x (q: 4*(32+32), v: 4*(32+16)) = 2 * (256 + 192)
    assert t == 2 * (4 * 64 + 4 * 48)
    assert total > t


def test_fold_unfold_exact_and_disable():
    am = AdapterModel(tiny_llama())
    am.add_adapter("a", LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    randomize(am.adapter_parameters("a"))
    base_ref = logits(tiny_llama())
    before = {n: p.clone() for n, p in am.model.state_dict().items()}
    out = logits(am)
    am.fold("a")
    torch.testing.assert_close(logits(am), out, atol=1e-5, rtol=0)
    with am.disabled():
        torch.testing.assert_close(logits(am), base_ref)
    torch.testing.assert_close(logits(am), out, atol=1e-5, rtol=0)
    am.unfold()
    for n, p in am.model.state_dict().items():
        assert torch.equal(p, before[n]), n  # bit-exact
    plain = am.merge_and_unload()
    assert not any("adapters" in n for n in plain.state_dict())
    torch.testing.assert_close(logits(plain), out, atol=1e-5, rtol=0)


def test_two_adapters_active_sum_and_delete():
    am = AdapterModel(tiny_llama())
    am.add_adapter("a", LoraConfig(r=2, target_modules=["q_proj"]))
    am.add_adapter("b", LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    randomize(am.adapter_parameters("a"), seed=1)
    randomize(am.adapter_parameters("b"), seed=2)
    assert am.active == ["a"]
    la = logits(am)
    am.set_active("b")
    lb = logits(am)
    am.set_active(["a", "b"])
    lab = logits(am)
    # linear in the deltas? not exactly through the network; check via folding instead
    am.fold(["a", "b"])
    torch.testing.assert_close(logits(am), lab, atol=1e-5, rtol=0)
    am.unfold()
    assert not torch.allclose(la, lb)
    am.delete_adapter("a")
    assert am.active == ["b"]
    torch.testing.assert_close(logits(am), lb)
    am.delete_adapter("b")
    assert not list(am.adapted_layers())
    torch.testing.assert_close(logits(am), logits(tiny_llama()))


def test_bad_configs():
    with pytest.raises(AdapterConfigError, match="did you mean 'lora_alpha'"):
        LoraConfig.from_dict({"r": 4, "lora_alpah": 8})
    am = AdapterModel(tiny_llama())
    with pytest.raises(AdapterConfigError, match=r"matched no module.*q_proj"):
        am.add_adapter("a", LoraConfig(target_modules=["nope"]))
    with pytest.raises(AdapterConfigError, match="'r'"):
        LoraConfig.from_dict({"r": 0})
    am.add_adapter("a", LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(AdapterConfigError, match="already exists"):
        am.add_adapter("a", LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(AdapterConfigError, match="no adapter named 'zz'"):
        am.set_active("zz")


def test_default_targets_by_model_type():
    am = AdapterModel(tiny_llama())
    am.add_adapter("a", LoraConfig())
    assert sorted({p.rsplit(".", 1)[1] for p, _ in am.named_adapter_modules("a")}) == [
        "q_proj",
        "v_proj",
    ]


PEFT_CASES = {
    "llama-qv": ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])),
    "llama-rslora-patterns": (
        "llama",
        dict(
            r=4,
            lora_alpha=8,
            use_rslora=True,
            target_modules=["q_proj", "v_proj", "down_proj"],
            rank_pattern={"down_proj": 2},
            alpha_pattern={"layers.1.self_attn.q_proj": 5},
        ),
    ),
    "llama-all-linear": ("llama", dict(r=2, lora_alpha=4, target_modules="all-linear")),
    "llama-regex": ("llama", dict(r=2, target_modules=r".*layers\.1\..*(gate|up)_proj")),
    "gpt2-conv1d": ("gpt2", dict(r=4, lora_alpha=16, target_modules=["c_attn", "c_fc"])),
    "bert-cls-head": (
        "bert",
        dict(r=4, target_modules=["query", "value"], modules_to_save=["classifier"]),
    ),
}


@pytest.mark.parametrize("case", sorted(PEFT_CASES))
def test_peft_to_splice(case, tmp_path):
    kind, kw = PEFT_CASES[case]
    extra = {"fan_in_fan_out": True} if kind == "gpt2" else {}
    task = {"bert": "SEQ_CLS"}.get(kind, "CAUSAL_LM")
    peft_to_splice(kind, PeftLoraConfig(task_type=task, **kw, **extra), tmp_path)


@pytest.mark.parametrize("case", sorted(PEFT_CASES))
def test_splice_to_peft(case, tmp_path):
    kind, kw = PEFT_CASES[case]
    splice_to_peft(kind, LoraConfig(**kw), tmp_path)


def test_default_targets_match_peft_table():
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as peft

    from splice.adapters.default_targets import DEFAULT_TARGETS

    for model_type, targets in DEFAULT_TARGETS["lora"].items():
        assert targets == peft[model_type], model_type


def test_new_adapter_follows_the_models_mode():
    # An adapter added to a model in eval mode must not apply dropout (nn.Module starts in
    # train mode); one added in train mode does.
    model = nn.Sequential(nn.Linear(8, 8))
    model.eval()
    am = AdapterModel(model)
    am.add_adapter("a", LoraConfig(r=2, lora_dropout=0.9, target_modules=["0"]))
    randomize(am.adapter_parameters("a"))
    assert not am.model[0].adapters["a"].training
    x = torch.randn(4, 8)
    torch.testing.assert_close(am(x), am(x))
    am.train()
    am.add_adapter("b", LoraConfig(r=2, lora_dropout=0.9, target_modules=["0"]))
    assert am.model[0].adapters["b"].training
