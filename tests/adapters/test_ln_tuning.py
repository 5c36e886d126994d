"""LayerNorm tuning: values against the definition (LayerNorm and RMSNorm), PEFT's key names
and default targets, fold/unfold, training, PEFT parity both ways."""

import pytest
import torch
from fold_train_checks import check_fold, check_training, cls_loss
from peft import LNTuningConfig as PeftLNTuningConfig
from peft_parity import peft_to_splice, splice_to_peft
from tiny import logits, tiny_bert_cls, tiny_gpt2, tiny_llama
from torch import nn

from splice.adapters import AdapterConfigError, AdapterModel, LNTuningConfig, adapter_state


def test_layernorm_copy_replaces_the_base():
    am = AdapterModel(nn.Sequential(nn.LayerNorm(2, eps=0.0)))  # base γ = 1, β = 0
    am.add_adapter("a", LNTuningConfig(target_modules=["0"]))
    copy = am.model[0].adapters["a"].module
    with torch.no_grad():
        copy.weight.copy_(torch.tensor([2.0, 0.5]))
        copy.bias.copy_(torch.tensor([1.0, -1.0]))
    # x = [1, 3]: mean 2, biased var 1 -> x̂ = [−1, 1]; γ x̂ + β = [−2+1, .5−1] = [−1, −.5]
    torch.testing.assert_close(am(torch.tensor([[1.0, 3.0]])), torch.tensor([[-1.0, -0.5]]))
    d = am.deltas("a")
    torch.testing.assert_close(d["0.weight"], torch.tensor([1.0, -0.5]))  # γ_copy − γ
    torch.testing.assert_close(d["0.bias"], torch.tensor([1.0, -1.0]))  # β_copy − β
    assert set(adapter_state(am, "a")) == {
        "base_model.model.0.ln_tuning_layers.weight",
        "base_model.model.0.ln_tuning_layers.bias",
    }
    with am.disabled():  # x̂ = [−1, 1] with γ = 1, β = 0
        torch.testing.assert_close(am(torch.tensor([[1.0, 3.0]])), torch.tensor([[-1.0, 1.0]]))


def test_rmsnorm_copy():
    am = AdapterModel(nn.Sequential(nn.RMSNorm(2, eps=0.0)))
    am.add_adapter("a", LNTuningConfig(target_modules=["0"]))
    with torch.no_grad():
        am.model[0].adapters["a"].module.weight.copy_(torch.tensor([3.0, 2.0]))
    # x = [1, −1]: rms = √((1+1)/2) = 1 -> x̂ = x; γ x̂ = [3, −2]
    torch.testing.assert_close(am(torch.tensor([[1.0, -1.0]])), torch.tensor([[3.0, -2.0]]))
    assert set(am.deltas("a")) == {"0.weight"}  # RMSNorm has no β


def test_default_targets_by_model_type():
    cases = [
        (tiny_llama, {"input_layernorm", "post_attention_layernorm", "norm"}),
        (tiny_gpt2, {"ln_1", "ln_2", "ln_f"}),
        (tiny_bert_cls, {"LayerNorm"}),  # splice's addition (PEFT has no BERT default)
    ]
    for factory, names in cases:
        am = AdapterModel(factory())
        am.add_adapter("a", LNTuningConfig())
        assert {p.rsplit(".", 1)[1] for p, _ in am.named_adapter_modules("a")} == names


def test_init_identity_fold_unfold():
    for factory in (tiny_llama, tiny_bert_cls):
        ref = logits(factory())
        am = AdapterModel(factory())
        am.add_adapter("a", LNTuningConfig())
        torch.testing.assert_close(logits(am), ref)
        with torch.no_grad():
            for p in am.adapter_parameters("a"):
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.2)
        check_fold(am, "a", ref)


def test_training_changes_only_the_copies():
    am = AdapterModel(tiny_llama())
    am.add_adapter("a", LNTuningConfig())
    check_training(am, "a")
    am = AdapterModel(tiny_bert_cls())
    am.add_adapter("a", LNTuningConfig())
    check_training(am, "a", loss_fn=cls_loss)


def test_bad_configs():
    with pytest.raises(AdapterConfigError, match="unknown key 'r'"):
        LNTuningConfig.from_dict({"r": 4})
    am = AdapterModel(tiny_llama())
    with pytest.raises(AdapterConfigError, match=r"SiLU.*, which ln_tuning does not support"):
        am.add_adapter("a", LNTuningConfig(target_modules=["act_fn"]))


PEFT_CASES = {
    "llama-default": (
        "llama",
        dict(target_modules=["input_layernorm", "post_attention_layernorm", "norm"]),
    ),
    "llama-final-only": ("llama", dict(target_modules=r"model\.norm")),
    "bert-layernorm-head": (
        "bert",
        dict(target_modules=["LayerNorm"], modules_to_save=["classifier"]),
    ),
    "gpt2-default": ("gpt2", dict(target_modules=["ln_1", "ln_2", "ln_f"])),
}


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("case", sorted(PEFT_CASES))
def test_peft_to_splice(case, tmp_path):
    kind, kw = PEFT_CASES[case]
    task = {"bert": "SEQ_CLS"}.get(kind, "CAUSAL_LM")
    peft_to_splice(kind, PeftLNTuningConfig(task_type=task, **kw), tmp_path)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("case", sorted(PEFT_CASES))
def test_splice_to_peft(case, tmp_path):
    kind, kw = PEFT_CASES[case]
    splice_to_peft(kind, LNTuningConfig(**kw), tmp_path)
