"""Bottleneck adapters: values against the definition, sizes, placements, not foldable,
save/load round trip and malformed folders, training."""

import json

import pytest
import torch
from fold_train_checks import check_training, cls_loss
from tiny import logits, randomize, tiny_bert_cls, tiny_gpt2, tiny_llama
from torch import nn

from splice.adapters import (
    AdapterConfigError,
    AdapterModel,
    AdapterStateError,
    BottleneckConfig,
    load_adapter_model,
    save_adapter,
)
from splice.errors import CheckpointError


def _adapted(non_linearity="relu", scaling=2.0):
    base = nn.Linear(2, 2)
    with torch.no_grad():  # base: y = x
        base.weight.copy_(torch.eye(2))
        base.bias.zero_()
    am = AdapterModel(nn.Sequential(base))
    cfg = BottleneckConfig(
        target_modules=["0"], bottleneck_size=1, non_linearity=non_linearity, scaling=scaling
    )
    am.add_adapter("a", cfg)
    ad = am.model[0].adapters["a"]
    with torch.no_grad():
        ad.adapter_down.weight.copy_(torch.tensor([[1.0, -1.0]]))
        ad.adapter_down.bias.zero_()
        ad.adapter_up.weight.copy_(torch.tensor([[2.0], [3.0]]))
        ad.adapter_up.bias.copy_(torch.tensor([0.5, 0.0]))
    return am


def test_residual_bottleneck_values():
    am = _adapted()
    # h = [3, 1]; down = 3 − 1 = 2; relu 2; up = [2·2 + .5, 3·2] = [4.5, 6]; s = 2 -> [9, 12]
    # h + s·up = [12, 13]
    torch.testing.assert_close(am(torch.tensor([[3.0, 1.0]])), torch.tensor([[12.0, 13.0]]))
    # h = [1, 3]: down = −2, relu 0, up = b_up = [.5, 0] -> h + 2·[.5, 0] = [2, 3]
    torch.testing.assert_close(am(torch.tensor([[1.0, 3.0]])), torch.tensor([[2.0, 3.0]]))


@pytest.mark.parametrize(
    "act,f2",
    [
        ("tanh", 0.9640276),  # tanh(2)
        ("swish", 1.7615942),  # 2·σ(2) = 2 · .8807971
        ("silu", 1.7615942),
        ("gelu", 1.9544997),  # 2·Φ(2) = 2 · .9772499 (exact erf GELU)
    ],
)
def test_non_linearities(act, f2):
    am = _adapted(act, scaling=1.0)
    # h = [3, 1]: down = 2; out = h + [2 f(2) + .5, 3 f(2)]
    want = torch.tensor([[3 + 2 * f2 + 0.5, 1 + 3 * f2]])
    torch.testing.assert_close(am(torch.tensor([[3.0, 1.0]])), want)


def test_sizes_and_init():
    am = AdapterModel(tiny_llama())
    am.add_adapter("a", BottleneckConfig(reduction_factor=8))  # hidden 32 -> 4
    am.add_adapter("b", BottleneckConfig(bottleneck_size=3))
    am.add_adapter("c", BottleneckConfig())  # default reduction 16 -> 2
    for name, m in (("a", 4), ("b", 3), ("c", 2)):
        for _, mod in am.named_adapter_modules(name):
            assert mod.adapter_down.weight.shape == (m, 32)
    ref = logits(tiny_llama())
    am = AdapterModel(tiny_llama())
    am.add_adapter("a", BottleneckConfig(placement="houlsby"))
    torch.testing.assert_close(logits(am), ref)  # mam_adapter init: W_up = 0, exact identity
    for init in ("bert", "houlsby"):  # AdapterHub's near-identity inits
        am = AdapterModel(tiny_llama())
        am.add_adapter("a", BottleneckConfig(init_weights=init))
        diff = (logits(am) - ref).abs().max()
        assert 0 < diff < 0.05


def test_placements_by_model_type():
    want = {
        tiny_llama: {
            "houlsby": {"self_attn.o_proj", "mlp.down_proj"},
            "pfeiffer": {"mlp.down_proj"},
        },
        tiny_bert_cls: {
            "houlsby": {"attention.output.dense", "output.dense"},
            "pfeiffer": {"output.dense"},
        },
        tiny_gpt2: {"houlsby": {"attn.c_proj", "mlp.c_proj"}, "pfeiffer": {"mlp.c_proj"}},
    }
    for factory, by_placement in want.items():
        for placement, tails in by_placement.items():
            am = AdapterModel(factory())
            am.add_adapter("a", BottleneckConfig(placement=placement))
            paths = [p for p, _ in am.named_adapter_modules("a")]
            assert len(paths) == 2 * len(tails)  # two layers
            for t in tails:  # every site adapted, in both layers ...
                assert sum(p.endswith("." + t) for p in paths) >= 2, (t, paths)
            assert all(any(p.endswith("." + t) for t in tails) for p in paths)  # ... no other
            if placement == "pfeiffer":
                assert not any("attention" in p or "attn" in p for p in paths)
    am = AdapterModel(tiny_llama())  # explicit targets override the placement
    am.add_adapter("a", BottleneckConfig(placement="houlsby", target_modules=["up_proj"]))
    assert {p.rsplit(".", 1)[1] for p, _ in am.named_adapter_modules("a")} == {"up_proj"}


def test_not_foldable():
    am = AdapterModel(tiny_llama())
    am.add_adapter("a", BottleneckConfig())
    with pytest.raises(AdapterStateError, match="acts on activations and cannot be folded"):
        am.fold("a")
    with pytest.raises(AdapterStateError, match="has no delta"):
        am.deltas("a")
    with pytest.raises(AdapterStateError, match="cannot be folded"):
        am.merge_and_unload()


def test_dropout_only_in_training():
    am = AdapterModel(tiny_llama())
    am.add_adapter("a", BottleneckConfig(dropout=0.5))
    randomize(am.adapter_parameters("a"), scale=0.5)
    am.eval()
    ref = logits(am)
    torch.testing.assert_close(logits(am), ref)  # eval: deterministic
    am.train()
    assert not torch.allclose(logits(am), ref)


def test_save_load_round_trip(tmp_path):
    for factory, cfg in (
        (tiny_bert_cls, BottleneckConfig(placement="houlsby", non_linearity="gelu")),
        (tiny_gpt2, BottleneckConfig(bottleneck_size=5, scaling=0.5)),
    ):
        am = AdapterModel(factory())
        am.add_adapter("a", cfg)
        randomize(am.adapter_parameters("a"), scale=0.5)
        expected = logits(am)
        assert (expected - logits(factory())).abs().max() > 1e-3
        out = tmp_path / factory.__name__
        save_adapter(am, out, name="a")
        saved = json.loads((out / "adapter_config.json").read_text())
        assert saved["peft_type"] == "SPLICE_BOTTLENECK"
        loaded = load_adapter_model(factory(), out)
        assert torch.equal(logits(loaded), expected)  # identical


def test_unknown_and_malformed_folders(tmp_path):
    am = AdapterModel(tiny_llama())
    am.add_adapter("a", BottleneckConfig(bottleneck_size=4))
    save_adapter(am, tmp_path / "ok", name="a")
    cfg_path = tmp_path / "ok" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    with pytest.raises(CheckpointError, match=r"no adapter_config\.json"):
        load_adapter_model(tiny_llama(), tmp_path)
    cfg_path.write_text(json.dumps({**cfg, "peft_type": "SPLICE_NOPE"}))
    with pytest.raises(AdapterConfigError, match="'SPLICE_NOPE' is not supported"):
        load_adapter_model(tiny_llama(), tmp_path / "ok")
    cfg_path.write_text(json.dumps({**cfg, "bottleneck_size": 8}))  # tensors are for 4
    with pytest.raises(
        AdapterStateError, match=r"adapter_down\.\w+: saved shape \(4,.*\) != expected \(8,"
    ):
        load_adapter_model(tiny_llama(), tmp_path / "ok")
    cfg_path.write_text(json.dumps({**cfg, "non_linearity": "softplus"}))
    with pytest.raises(AdapterConfigError, match="non_linearity"):
        load_adapter_model(tiny_llama(), tmp_path / "ok")
    cfg_path.write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_adapter_model(tiny_llama(), tmp_path / "ok")


def test_training_changes_only_the_adapter():
    am = AdapterModel(tiny_llama())
    am.add_adapter("a", BottleneckConfig(placement="houlsby", reduction_factor=4))
    check_training(am, "a")
    am = AdapterModel(tiny_bert_cls())
    am.add_adapter("a", BottleneckConfig(non_linearity="swish"))
    check_training(am, "a", loss_fn=cls_loss)


def test_bad_configs():
    with pytest.raises(AdapterConfigError, match="not both"):
        BottleneckConfig.from_dict({"reduction_factor": 8, "bottleneck_size": 4})
    with pytest.raises(AdapterConfigError, match="placement"):
        BottleneckConfig.from_dict({"placement": "parallel"})
    with pytest.raises(AdapterConfigError, match="did you mean 'reduction_factor'"):
        BottleneckConfig.from_dict({"reduction": 8})
    am = AdapterModel(tiny_llama())
    with pytest.raises(AdapterConfigError, match="exceeds the hidden size 32"):
        am.add_adapter("a", BottleneckConfig(bottleneck_size=64))
    with pytest.raises(AdapterConfigError, match="LlamaRMSNorm, which bottleneck does not"):
        am.add_adapter("a", BottleneckConfig(target_modules=["norm"]))
