"""DoRA (use_dora=True): values against W' = m · (W + sBA) / ‖W + sBA‖_row, PEFT's forward
(dropout, bias), fold/unfold, PEFT parity both ways."""

import math

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model
from peft_parity import peft_to_splice, splice_to_peft
from tiny import logits, randomize, tiny_llama
from torch import nn

from splice.adapters import AdapterConfigError, AdapterModel, LoraConfig

R5 = math.sqrt(5)


def _two_by_two(bias=True, dropout=0.0):
    base = nn.Sequential(nn.Linear(2, 2, bias=bias))
    with torch.no_grad():
        base[0].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
        if bias:
            base[0].bias.copy_(torch.tensor([0.5, -1.0]))
    am = AdapterModel(base)
    am.add_adapter(
        "d",
        LoraConfig(r=1, lora_alpha=1, use_dora=True, lora_dropout=dropout, target_modules=["0"]),
    )
    dora = am.model[0].adapters["d"]
    # magnitude starts at ‖W‖_row = [1, 2] (B = 0 at init)
    torch.testing.assert_close(dora.lora_magnitude_vector.detach(), torch.tensor([1.0, 2.0]))
    with torch.no_grad():
        dora.lora_A.weight.copy_(torch.tensor([[1.0, 1.0]]))
        dora.lora_B.weight.copy_(torch.tensor([[1.0], [0.0]]))
        dora.lora_magnitude_vector.copy_(torch.tensor([1.0, 3.0]))
    return am


def test_dora_value_2x2():
    am = _two_by_two()
    # s = 1/1; BA = [[1,1],[0,0]]; W + sBA = [[2,1],[0,2]]; row norms [√5, 2]; m = [1, 3]
    # W' = [[2/√5, 1/√5], [0, 3]];  x = [1, 1]: W'x = [3/√5, 3]; + b = [3/√5 + 0.5, 2]
    x = torch.tensor([[1.0, 1.0]])
    torch.testing.assert_close(am(x), torch.tensor([[3 / R5 + 0.5, 2.0]]))
    # ΔW = W' − W = [[2/√5 − 1, 1/√5], [0, 1]]; the bias is not rescaled
    d = am.deltas("d")
    torch.testing.assert_close(d["0.weight"], torch.tensor([[2 / R5 - 1, 1 / R5], [0.0, 1.0]]))
    assert set(d) == {"0.weight"}
    am.fold("d")
    torch.testing.assert_close(am(x), torch.tensor([[3 / R5 + 0.5, 2.0]]))


def test_dora_norm_is_detached():
    am = _two_by_two(bias=False)
    dora = am.model[0].adapters["d"]
    am(torch.tensor([[1.0, 1.0]])).sum().backward()
    # y = c ⊙ (W + BA) x with c = m / n, n treated as a constant (DoRA §4.3):
    # dy0/dm0 = (W+BA)_0 x / n0 = 3/√5; dy1/dm1 = 2/2 = 1
    torch.testing.assert_close(dora.lora_magnitude_vector.grad, torch.tensor([3 / R5, 1.0]))
    # dΣy/dB[o,0] = c_o · (A x) with A x = 2 (no term through the norm):
    # [(1/√5) · 2, (3/2) · 2] = [2/√5, 3]
    torch.testing.assert_close(dora.lora_B.weight.grad, torch.tensor([[2 / R5], [3.0]]))


def test_dora_dropout_train_vs_eval():
    am = _two_by_two(dropout=0.5)
    x = torch.tensor([[1.0, 1.0]])
    am.eval()
    torch.testing.assert_close(am(x), torch.tensor([[3 / R5 + 0.5, 2.0]]))
    am.train()
    torch.manual_seed(0)
    drop = nn.Dropout(0.5)
    torch.manual_seed(0)
    got = am(x)
    torch.manual_seed(0)
    dx = drop(x)
    # PEFT's training path: Wx + b + (c − 1) W d(x) + c s B A d(x)
    w = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    c = torch.tensor([1 / R5, 3 / 2])
    ba = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    want = x @ w.T + torch.tensor([0.5, -1.0]) + (c - 1) * (dx @ w.T) + c * (dx @ ba.T)
    torch.testing.assert_close(got, want)
    assert not torch.allclose(got, am.eval()(x))


def test_dora_fold_unfold_and_merge_on_llama():
    am = AdapterModel(tiny_llama())
    am.add_adapter("a", LoraConfig(r=4, use_dora=True, target_modules=["q_proj", "v_proj"]))
    torch.testing.assert_close(logits(am), logits(tiny_llama()))  # identity at init
    randomize(am.adapter_parameters("a"))
    before = {n: p.clone() for n, p in am.model.state_dict().items()}
    out = logits(am)
    am.fold("a")
    torch.testing.assert_close(logits(am), out, atol=1e-5, rtol=0)
    am.unfold()
    for n, p in am.model.state_dict().items():
        assert torch.equal(p, before[n]), n
    plain = am.merge_and_unload()
    torch.testing.assert_close(logits(plain), out, atol=1e-5, rtol=0)


def test_dora_matches_peft_merge_and_deltas():
    pm = get_peft_model(
        tiny_llama(), PeftLoraConfig(r=4, use_dora=True, target_modules=["q_proj", "v_proj"])
    )
    randomize([p for p in pm.parameters() if p.requires_grad])
    sd = {k: v.clone() for k, v in pm.state_dict().items()}
    merged = pm.merge_and_unload().state_dict()
    am = AdapterModel(tiny_llama())
    am.add_adapter("default", LoraConfig(r=4, use_dora=True, target_modules=["q_proj", "v_proj"]))
    own = am.state_dict()
    for k in own:
        if ".adapters.default." in k:
            path, suffix = k.removeprefix("model.").split(".adapters.default.")
            key = f"base_model.model.{path}.{suffix.replace('lora_', 'lora_', 1)}"
            key = key.replace(".lora_A.weight", ".lora_A.default.weight")
            key = key.replace(".lora_B.weight", ".lora_B.default.weight")
            key = key.replace("lora_magnitude_vector", "lora_magnitude_vector.default.weight")
            own[k].copy_(sd[key])
    base = tiny_llama().state_dict()
    for name, d in am.deltas("default").items():
        torch.testing.assert_close(base[name] + d, merged[name], atol=1e-6, rtol=0)


def test_dora_config_errors():
    with pytest.raises(AdapterConfigError, match="lora_bias=True is not supported with use_dora"):
        LoraConfig.from_dict({"use_dora": True, "lora_bias": True})
    with pytest.raises(AdapterConfigError, match="use_dora"):
        LoraConfig.from_dict({"use_dorra": True})


PEFT_CASES = {
    "llama-qv": ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])),
    "llama-mlp-rslora": (
        "llama",
        dict(r=4, lora_alpha=8, use_rslora=True, target_modules=["gate_proj", "down_proj"]),
    ),
    "gpt2-conv1d": ("gpt2", dict(r=4, lora_alpha=16, target_modules=["c_attn", "c_fc"])),
    "bert-cls": (
        "bert",
        dict(r=4, target_modules=["query", "value"], modules_to_save=["classifier"]),
    ),
    "llama-embed": ("llama", dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"])),
}


@pytest.mark.parametrize("case", sorted(PEFT_CASES))
def test_dora_peft_to_splice(case, tmp_path):
    kind, kw = PEFT_CASES[case]
    extra = {"fan_in_fan_out": True} if kind == "gpt2" else {}
    task = {"bert": "SEQ_CLS"}.get(kind, "CAUSAL_LM")
    peft_to_splice(kind, PeftLoraConfig(task_type=task, use_dora=True, **kw, **extra), tmp_path)


@pytest.mark.parametrize("case", sorted(PEFT_CASES))
def test_dora_splice_to_peft(case, tmp_path):
    kind, kw = PEFT_CASES[case]
    splice_to_peft(kind, LoraConfig(use_dora=True, **kw), tmp_path)
