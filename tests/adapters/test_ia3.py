"""(IA)³: values against the definition, fold/unfold, training, PEFT parity both ways."""

import pytest
import torch
from adapter_checks import fold_roundtrip, train_lowers_loss
from peft import IA3Config as PeftIA3Config
from peft_parity import peft_to_splice, splice_to_peft
from tiny import logits, randomize, tiny_gpt2, tiny_llama
from torch import nn

from splice.adapters import AdapterConfigError, AdapterModel
from splice.adapters.methods.ia3 import IA3Config


def _base():
    base = nn.Sequential(nn.Linear(3, 2, bias=True))
    with torch.no_grad():
        base[0].weight.copy_(torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, -1.0]]))
        base[0].bias.copy_(torch.tensor([0.5, -0.5]))
    return base


X = torch.tensor([[1.0, 2.0, 3.0]])  # base: W x + b = [1+6+0.5, 2-3-0.5] = [7.5, -1.5]


def test_output_scaling_values():
    am = AdapterModel(_base())
    am.add_adapter("a", IA3Config(target_modules=["0"], feedforward_modules=[]))
    ia3 = am.model[0].adapters["a"]
    assert ia3.ia3_l.shape == (2, 1)
    torch.testing.assert_close(am(X), torch.tensor([[7.5, -1.5]]))  # init l = 1: identity
    with torch.no_grad():
        ia3.ia3_l.copy_(torch.tensor([[2.0], [-1.0]]))
    # l ⊙ y = [2 * 7.5, -1 * -1.5] = [15, 1.5]
    torch.testing.assert_close(am(X), torch.tensor([[15.0, 1.5]]))
    d = am.deltas("a")
    # ΔW = W ⊙ (l - 1) by rows: row0 * 1 = [1, 0, 2]; row1 * (-2) = [0, -2, 2]
    torch.testing.assert_close(d["0.weight"], torch.tensor([[1.0, 0.0, 2.0], [0.0, -2.0, 2.0]]))
    # Δb = b ⊙ (l - 1) = [0.5 * 1, -0.5 * -2] = [0.5, 1.0]
    torch.testing.assert_close(d["0.bias"], torch.tensor([0.5, 1.0]))
    am.fold("a")
    torch.testing.assert_close(am(X), torch.tensor([[15.0, 1.5]]))


def test_feedforward_input_scaling_values():
    am = AdapterModel(_base())
    am.add_adapter("a", IA3Config(target_modules=["0"], feedforward_modules=["0"]))
    ia3 = am.model[0].adapters["a"]
    assert ia3.ia3_l.shape == (1, 3)
    with torch.no_grad():
        ia3.ia3_l.copy_(torch.tensor([[1.0, 0.5, 2.0]]))
    # x' = l ⊙ x = [1, 1, 6]; W x' + b = [1+12+0.5, 1-6-0.5] = [13.5, -5.5]
    torch.testing.assert_close(am(X), torch.tensor([[13.5, -5.5]]))
    d = am.deltas("a")
    # ΔW = W ⊙ (l - 1) by columns, l - 1 = [0, -0.5, 1]: [[0, 0, 2], [0, -0.5, -1]]; no Δb
    torch.testing.assert_close(d["0.weight"], torch.tensor([[0.0, 0.0, 2.0], [0.0, -0.5, -1.0]]))
    assert "0.bias" not in d


def test_two_adapters_multiply():
    am = AdapterModel(_base())
    am.add_adapter("a", IA3Config(target_modules=["0"], feedforward_modules=[]))
    am.add_adapter("b", IA3Config(target_modules=["0"], feedforward_modules=[]))
    with torch.no_grad():
        am.model[0].adapters["a"].ia3_l.copy_(torch.tensor([[2.0], [3.0]]))
        am.model[0].adapters["b"].ia3_l.copy_(torch.tensor([[0.5], [-1.0]]))
    am.set_active(["a", "b"])
    # [7.5 * 2 * 0.5, -1.5 * 3 * -1] = [7.5, 4.5]
    torch.testing.assert_close(am(X), torch.tensor([[7.5, 4.5]]))
    am.fold(["a", "b"])
    torch.testing.assert_close(am(X), torch.tensor([[7.5, 4.5]]))


def test_default_targets_and_feedforward_llama():
    am = AdapterModel(tiny_llama())
    am.add_adapter("a", IA3Config())
    cfg = am.configs["a"]
    assert cfg.target_modules == ["k_proj", "v_proj", "down_proj"]
    assert cfg.feedforward_modules == ["down_proj"]
    mods = dict(am.named_adapter_modules("a"))
    assert mods["model.layers.0.mlp.down_proj"].ia3_l.shape == (1, 48)  # input of down_proj
    assert mods["model.layers.0.self_attn.k_proj"].ia3_l.shape == (16, 1)
    t, _ = am.trainable_parameters()
    assert t == 2 * (48 + 16 + 16)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_fold_unfold_and_deltas(kind):
    factory = {"llama": tiny_llama, "gpt2": tiny_gpt2}[kind]
    am = AdapterModel(factory())
    am.add_adapter("a", IA3Config())  # gpt2: c_attn (Conv1D, output), mlp.c_proj (input)
    randomize(am.adapter_parameters("a"), scale=0.5)
    with torch.no_grad():
        for p in am.adapter_parameters("a"):
            p.add_(1.0)  # l near 1: a moderate change
    fold_roundtrip(am, "a", logits(factory()))


def test_conv2d_output_and_input_scaling():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 2, 1))
    x = torch.randn(2, 2, 5, 5)
    am = AdapterModel(net)
    am.add_adapter("a", IA3Config(target_modules=["0", "2"], feedforward_modules=["2"]))
    randomize(am.adapter_parameters("a"), scale=1.0)
    l0 = am.model[0].adapters["a"].ia3_l  # (1, 3, 1, 1): output channels of conv 0
    l2 = am.model[2].adapters["a"].ia3_l  # (1, 3, 1, 1): input channels of conv 2
    assert l0.shape == l2.shape == (1, 3, 1, 1)
    with am.disabled():
        ref = net[2].base_layer(l2 * torch.relu(net[0].base_layer(x) * l0))
    out = am(x)
    torch.testing.assert_close(out, ref)
    am.fold("a")
    torch.testing.assert_close(am(x), out, atol=1e-5, rtol=0)


def test_training_changes_only_ia3():
    am = AdapterModel(tiny_llama())
    am.add_adapter("a", IA3Config())
    train_lowers_loss(am, "a")


def test_bad_configs():
    with pytest.raises(AdapterConfigError, match="did you mean 'feedforward_modules'"):
        IA3Config.from_dict({"feedforward_module": ["x"]})
    with pytest.raises(AdapterConfigError, match="not in target_modules"):
        IA3Config.from_dict({"target_modules": ["k_proj"], "feedforward_modules": ["down_proj"]})
    with pytest.raises(AdapterConfigError, match="not a valid regex"):
        IA3Config.from_dict({"feedforward_modules": "(("})
    am = AdapterModel(_base())  # no config.model_type: feedforward_modules must be given
    with pytest.raises(AdapterConfigError, match="set feedforward_modules"):
        am.add_adapter("a", IA3Config(target_modules=["0"]))
    am = AdapterModel(nn.Sequential(nn.Embedding(4, 2)))
    with pytest.raises(AdapterConfigError, match="Embedding, which ia3 does not support"):
        am.add_adapter("a", IA3Config(target_modules=["0"], feedforward_modules=[]))


PEFT_CASES = {
    "llama-kv-down": (
        "llama",
        dict(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
    ),
    "llama-regex-ff": (
        "llama",
        dict(target_modules=r".*\.(q_proj|up_proj)", feedforward_modules=r".*up_proj"),
    ),
    "gpt2-conv1d": (
        "gpt2",
        dict(target_modules=["c_attn", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"]),
    ),
    "bert-cls-head": (
        "bert",
        dict(
            target_modules=["key", "value", "output.dense"],
            feedforward_modules=["output.dense"],
            modules_to_save=["classifier"],
        ),
    ),
}


@pytest.mark.parametrize("case", sorted(PEFT_CASES))
def test_peft_to_splice(case, tmp_path):
    kind, kw = PEFT_CASES[case]
    task = {"bert": "SEQ_CLS"}.get(kind, "CAUSAL_LM")
    extra = {"fan_in_fan_out": True} if kind == "gpt2" else {}
    peft_to_splice(kind, PeftIA3Config(task_type=task, **kw, **extra), tmp_path)


@pytest.mark.parametrize("case", sorted(PEFT_CASES))
def test_splice_to_peft(case, tmp_path):
    kind, kw = PEFT_CASES[case]
    splice_to_peft(kind, IA3Config(**kw), tmp_path)


def test_peft_merge_matches_fold(tmp_path):
    """PEFT's merge_and_unload and splice's fold give the same weights."""
    kind, kw = PEFT_CASES["gpt2-conv1d"]
    am, pm = peft_to_splice(
        kind, PeftIA3Config(task_type="CAUSAL_LM", fan_in_fan_out=True, **kw), tmp_path
    )
    merged = pm.merge_and_unload().state_dict()
    plain = am.merge_and_unload().state_dict()
    for k, v in merged.items():
        torch.testing.assert_close(plain[k], v, atol=1e-6, rtol=0)
