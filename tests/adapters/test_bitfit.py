"""BitFit: values against the definition (Linear, LayerNorm, Conv2d), skipped and added
biases, fold/unfold, save/load round trip, training."""

import json

import pytest
import torch
from fold_train_checks import check_fold, check_training, cls_loss
from tiny import logits, randomize, tiny_bert_cls, tiny_gpt2, tiny_llama
from torch import nn

from splice.adapters import (
    AdapterConfigError,
    AdapterModel,
    AdapterStateError,
    BitFitConfig,
    load_adapter_model,
    save_adapter,
)


def _linear(bias=True):
    lin = nn.Linear(2, 2, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
        if bias:
            lin.bias.copy_(torch.tensor([0.5, -0.5]))
    return lin


def test_linear_bias_shift_and_fold():
    am = AdapterModel(nn.Sequential(_linear()))
    am.add_adapter("a", BitFitConfig(target_modules=["0"]))
    with torch.no_grad():
        am.model[0].adapters["a"].bitfit_bias.copy_(torch.tensor([1.0, 2.0]))
    x = torch.tensor([[1.0, 1.0]])
    # W x + b = [3+.5, 7−.5] = [3.5, 6.5];  + Δb = [4.5, 8.5]
    torch.testing.assert_close(am(x), torch.tensor([[4.5, 8.5]]))
    assert set(am.deltas("a")) == {"0.bias"}
    torch.testing.assert_close(am.deltas("a")["0.bias"], torch.tensor([1.0, 2.0]))
    am.fold("a")  # b + Δb = [1.5, 1.5]
    torch.testing.assert_close(am.model[0].base_layer.bias.detach(), torch.tensor([1.5, 1.5]))
    torch.testing.assert_close(am(x), torch.tensor([[4.5, 8.5]]))
    am.unfold()
    assert torch.equal(am.model[0].base_layer.bias, torch.tensor([0.5, -0.5]))


def test_layernorm_and_conv_channel_axis():
    ln = nn.LayerNorm(2, eps=0.0)
    am = AdapterModel(nn.Sequential(ln))
    am.add_adapter("a", BitFitConfig(target_modules=["0"]))
    with torch.no_grad():
        am.model[0].adapters["a"].bitfit_bias.copy_(torch.tensor([1.0, -1.0]))
    # x = [1, 3] -> x̂ = [−1, 1] (γ = 1, β = 0); + Δβ = [0, 0]
    torch.testing.assert_close(am(torch.tensor([[1.0, 3.0]])), torch.tensor([[0.0, 0.0]]))
    conv = nn.Conv2d(1, 2, kernel_size=1)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([1.0, 2.0]).view(2, 1, 1, 1))
        conv.bias.zero_()
    am = AdapterModel(nn.Sequential(conv))
    am.add_adapter("a", BitFitConfig(target_modules=["0"]))
    with torch.no_grad():
        am.model[0].adapters["a"].bitfit_bias.copy_(torch.tensor([10.0, 20.0]))
    # ones (1,1,2,2): channel 0 = 1·1 + 10 = 11, channel 1 = 2·1 + 20 = 22 at every pixel
    out = am(torch.ones(1, 1, 2, 2))
    torch.testing.assert_close(out, torch.tensor([11.0, 22.0]).view(1, 2, 1, 1).expand(1, 2, 2, 2))
    am.fold("a")
    torch.testing.assert_close(am(torch.ones(1, 1, 2, 2)), out)


def test_biasless_modules_are_skipped_or_get_a_bias():
    am = AdapterModel(nn.Sequential(_linear(bias=False), _linear()))
    am.add_adapter("a", BitFitConfig(target_modules="all-linear"))
    assert [n for n, p in am.named_parameters() if p.requires_grad] == [
        "model.1.adapters.a.bitfit_bias"
    ]
    assert set(am.deltas("a")) == {"1.bias"}
    x = torch.tensor([[1.0, -1.0]])
    base = nn.Sequential(_linear(bias=False), _linear())
    am = AdapterModel(nn.Sequential(_linear(bias=False), _linear()))
    am.add_adapter("a", BitFitConfig(target_modules="all-linear", add_missing_bias=True))
    assert torch.equal(am.model[0].base_layer.bias, torch.zeros(2))  # a frozen zero bias
    assert not am.model[0].base_layer.bias.requires_grad
    torch.testing.assert_close(am(x), base(x))  # W x + 0 = W x
    with torch.no_grad():
        am.model[0].adapters["a"].bitfit_bias.copy_(torch.tensor([1.0, 1.0]))
    # layer 0: W x + Δb = [1−2, 3−4] + 1 = [0, 0];  layer 1: W·0 + b = [.5, −.5]
    torch.testing.assert_close(am(x), torch.tensor([[0.5, -0.5]]))
    plain = am.merge_and_unload()
    assert torch.equal(plain[0].bias, torch.tensor([1.0, 1.0]))  # Δb folded into the new bias
    torch.testing.assert_close(plain(x), torch.tensor([[0.5, -0.5]]))


def test_nothing_to_train_is_an_error():
    am = AdapterModel(tiny_llama())  # llama has no biases at all
    with pytest.raises(AdapterConfigError, match="none of the 14 targeted modules has a bias"):
        am.add_adapter("a", BitFitConfig())
    am.add_adapter("a", BitFitConfig(add_missing_bias=True))  # every linear gets one
    assert len(list(am.named_adapter_modules("a"))) == 14


def test_default_targets_are_the_biased_modules():
    am = AdapterModel(tiny_bert_cls())
    am.add_adapter("a", BitFitConfig())
    model_biases = {
        n.removesuffix(".bias")
        for n, _ in tiny_bert_cls().named_parameters()
        if n.endswith(".bias") and "classifier" not in n
    }
    assert {p for p, _ in am.named_adapter_modules("a")} == model_biases
    am = AdapterModel(tiny_gpt2())
    am.add_adapter("a", BitFitConfig())
    names = {n.removesuffix(".bias") for n, _ in tiny_gpt2().named_parameters() if "bias" in n}
    assert {p for p, _ in am.named_adapter_modules("a")} == names


def test_fold_unfold_and_training():
    ref = logits(tiny_bert_cls())
    am = AdapterModel(tiny_bert_cls())
    am.add_adapter("a", BitFitConfig())
    torch.testing.assert_close(logits(am), ref)  # Δb = 0
    randomize(am.adapter_parameters("a"), scale=0.5)
    check_fold(am, "a", ref)
    am = AdapterModel(tiny_bert_cls())
    am.add_adapter("a", BitFitConfig())
    check_training(am, "a", loss_fn=cls_loss)
    am = AdapterModel(tiny_llama())
    am.add_adapter("a", BitFitConfig(add_missing_bias=True))
    check_training(am, "a")


def test_save_load_round_trip(tmp_path):
    am = AdapterModel(tiny_gpt2())
    am.add_adapter("a", BitFitConfig(target_modules=["c_attn", "ln_f"]))
    randomize(am.adapter_parameters("a"))
    expected = logits(am)
    save_adapter(am, tmp_path / "bf", name="a")
    cfg = json.loads((tmp_path / "bf" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "SPLICE_BITFIT" and cfg["add_missing_bias"] is False
    loaded = load_adapter_model(tiny_gpt2(), tmp_path / "bf")
    assert torch.equal(logits(loaded), expected)


def test_bad_configs_and_folders(tmp_path):
    with pytest.raises(AdapterConfigError, match="did you mean 'add_missing_bias'"):
        BitFitConfig.from_dict({"add_missing_biases": True})
    am = AdapterModel(tiny_bert_cls())
    am.add_adapter("a", BitFitConfig(target_modules=["query"]))
    save_adapter(am, tmp_path / "bf", name="a")
    cfg_path = tmp_path / "bf" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "target_modules": ["query", "key"]}))
    with pytest.raises(AdapterStateError, match="missing"):  # key's Δb is not in the file
        load_adapter_model(tiny_bert_cls(), tmp_path / "bf")
    cfg_path.write_text(json.dumps({**cfg, "lr": 1}))
    with pytest.raises(AdapterConfigError, match="lr=1 is not supported"):
        load_adapter_model(tiny_bert_cls(), tmp_path / "bf")
