"""HRA: values against the definition (with and without Gram–Schmidt), the paired init,
fold/unfold, training, PEFT parity both ways."""

import pytest
import torch
from fold_train_checks import check_fold, check_training
from peft import HRAConfig as PeftHRAConfig
from peft_parity import peft_to_splice, splice_to_peft
from tiny import logits, randomize, tiny_gpt2, tiny_llama
from torch import nn

from splice.adapters import AdapterConfigError, AdapterModel, HRAConfig
from splice.adapters.methods.hra import gram_schmidt, householder_product

W = torch.tensor([[1.0, 2.0], [3.0, -1.0], [0.0, 1.0]])


def _hra(u, **kw):
    base = nn.Sequential(nn.Linear(2, 3, bias=True))
    with torch.no_grad():
        base[0].weight.copy_(W)
        base[0].bias.copy_(torch.tensor([0.5, 0.0, -1.0]))
    am = AdapterModel(base)
    am.add_adapter("a", HRAConfig(target_modules=["0"], r=u.shape[1], **kw))
    with torch.no_grad():
        am.model[0].adapters["a"].hra_u.copy_(u)
    return am


def test_two_reflections_without_gs():
    # u1 = (1,1) (norm √2, normalised inside), u2 = (2,0):
    # H1 = I − 2·(1,1)(1,1)ᵀ/2 = [[0,−1],[−1,0]];  H2 = I − 2 e1 e1ᵀ = [[−1,0],[0,1]]
    # H = H1 H2 = [[0,−1],[1,0]];  W' = W H = [[2,−1],[−1,−3],[1,0]]
    am = _hra(torch.tensor([[1.0, 2.0], [1.0, 0.0]]))
    h = torch.tensor([[0.0, -1.0], [1.0, 0.0]])
    torch.testing.assert_close(householder_product(am.model[0].adapters["a"].hra_u, False), h)
    torch.testing.assert_close(am.deltas("a")["0.weight"], W @ h - W)
    # x = (1,2): W' x + b = [2−2+.5, −1−6, 1−1] = [.5, −7, 0]
    torch.testing.assert_close(am(torch.tensor([[1.0, 2.0]])), torch.tensor([[0.5, -7.0, 0.0]]))


def test_gram_schmidt_variant():
    # u1 = (1,1), u2 = (1,0): q1 = (1,1)/√2; u2 − (q1·u2) q1 = (.5,−.5) -> q2 = (1,−1)/√2.
    # Q Qᵀ = I (a full basis of R²), so H = I − 2QQᵀ = −I and W' = −W
    u = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    s = 2**-0.5
    torch.testing.assert_close(gram_schmidt(u), torch.tensor([[s, s], [s, -s]]))
    am = _hra(u, apply_GS=True)
    torch.testing.assert_close(am.deltas("a")["0.weight"], -2 * W)
    # x = (1,2): −W x + b = [−5+.5, −1, −2−1]
    torch.testing.assert_close(am(torch.tensor([[1.0, 2.0]])), torch.tensor([[-4.5, -1.0, -3.0]]))
    # without GS the same vectors give H1 H2 = [[0,−1],[1,0]] (previous test): GS matters
    am = _hra(u)
    assert not torch.allclose(am.deltas("a")["0.weight"], -2 * W)


def test_paired_init_is_identity_and_odd_r_warns():
    ref = logits(tiny_llama())
    am = AdapterModel(tiny_llama())
    am.add_adapter("a", HRAConfig(r=4, target_modules=["q_proj", "v_proj"]))
    u = next(iter(am.named_adapter_modules("a")))[1].hra_u
    torch.testing.assert_close(u[:, 0], u[:, 1])  # pairs of repeated vectors
    torch.testing.assert_close(u[:, 2], u[:, 3])
    assert not torch.allclose(u[:, 0], u[:, 2])
    torch.testing.assert_close(logits(am), ref, atol=1e-5, rtol=0)  # H1 H1 = I
    am = AdapterModel(tiny_llama())
    with pytest.warns(UserWarning, match="r=3 is odd"):
        am.add_adapter("a", HRAConfig(r=3, target_modules=["q_proj"]))
    assert (logits(am) - ref).abs().max() > 1e-4  # as PEFT: random, not the base


def test_fold_unfold_llama_and_gpt2_conv1d():
    ref = logits(tiny_llama())
    am = AdapterModel(tiny_llama())
    am.add_adapter("a", HRAConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    randomize(am.adapter_parameters("a"), scale=0.5)
    check_fold(am, "a", ref)
    ref2 = logits(tiny_gpt2())  # splice only: Conv1D, W' = Hᵀ W
    am = AdapterModel(tiny_gpt2())
    am.add_adapter("a", HRAConfig(r=2, apply_GS=True, target_modules=["c_attn", "c_fc"]))
    randomize(am.adapter_parameters("a"), scale=0.5)
    check_fold(am, "a", ref2)


def test_training_changes_only_hra():
    am = AdapterModel(tiny_llama())
    am.add_adapter("a", HRAConfig(r=4, target_modules=["q_proj", "v_proj", "up_proj"]))
    check_training(am, "a")


def test_bad_configs():
    with pytest.raises(AdapterConfigError, match="'r'"):
        HRAConfig.from_dict({"r": 0})
    with pytest.raises(AdapterConfigError, match="did you mean 'apply_GS'"):
        HRAConfig.from_dict({"apply_gs": True})
    am = AdapterModel(tiny_llama())
    with pytest.raises(AdapterConfigError, match="LlamaRMSNorm, which hra does not support"):
        am.add_adapter("a", HRAConfig(target_modules=["input_layernorm"]))


PEFT_CASES = {
    "llama-qv-mlp": ("llama", dict(r=4, target_modules=["q_proj", "v_proj", "down_proj"])),
    "llama-gs-odd": ("llama", dict(r=3, apply_GS=True, target_modules=["k_proj", "gate_proj"])),
    "bert-qv-head": (
        "bert",
        dict(r=2, target_modules=["query", "value"], modules_to_save=["classifier"]),
    ),
}


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("case", sorted(PEFT_CASES))
def test_peft_to_splice(case, tmp_path):
    kind, kw = PEFT_CASES[case]
    task = {"bert": "SEQ_CLS"}.get(kind, "CAUSAL_LM")
    peft_to_splice(kind, PeftHRAConfig(task_type=task, **kw), tmp_path)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("case", sorted(PEFT_CASES))
def test_splice_to_peft(case, tmp_path):
    kind, kw = PEFT_CASES[case]
    splice_to_peft(kind, HRAConfig(**kw), tmp_path)
