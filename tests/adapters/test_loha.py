"""LoHa: values against the definition, Conv2d (plain and effective CP form), dropouts,
fold/unfold, training, PEFT parity both ways."""

import pytest
import torch
from adapter_checks import conv_peft_parity, fold_roundtrip, train_lowers_loss
from peft import LoHaConfig as PeftLoHaConfig
from peft_parity import peft_to_splice, splice_to_peft
from tiny import logits, randomize, tiny_llama
from torch import nn

from splice.adapters import AdapterConfigError, AdapterModel
from splice.adapters.methods.loha import LoHaConfig, cp_factor


def _lin():
    base = nn.Sequential(nn.Linear(3, 2, bias=True))
    with torch.no_grad():
        base[0].weight.copy_(torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, -1.0]]))
        base[0].bias.copy_(torch.tensor([0.5, -0.5]))
    return base


def _set(m, **values):
    with torch.no_grad():
        for k, v in values.items():
            getattr(m, k).copy_(torch.tensor(v))


def test_linear_delta_is_scaled_hadamard_of_two_low_rank():
    am = AdapterModel(_lin())
    am.add_adapter("a", LoHaConfig(r=1, alpha=2, target_modules=["0"]))
    loha = am.model[0].adapters["a"]
    assert loha.hada_w1_a.shape == (2, 1) and loha.hada_w1_b.shape == (1, 3)
    assert torch.equal(loha.hada_w2_b, torch.zeros(1, 3))  # init: ΔW = 0
    x = torch.tensor([[1.0, 2.0, 3.0]])
    torch.testing.assert_close(am(x), torch.tensor([[7.5, -1.5]]))
    _set(
        loha,
        hada_w1_a=[[1.0], [2.0]],
        hada_w1_b=[[1.0, 0.0, 1.0]],
        hada_w2_a=[[1.0], [-1.0]],
        hada_w2_b=[[2.0, 1.0, 0.0]],
    )
    # W1a W1b = [[1,0,1],[2,0,2]]; W2a W2b = [[2,1,0],[-2,-1,0]]; ⊙ = [[2,0,0],[-4,0,0]];
    # s = alpha / r = 2: ΔW = [[4,0,0],[-8,0,0]]
    torch.testing.assert_close(
        am.deltas("a")["0.weight"], torch.tensor([[4.0, 0.0, 0.0], [-8.0, 0.0, 0.0]])
    )
    # base [7.5, -1.5] + ΔW x = [4, -8] -> [11.5, -9.5]
    torch.testing.assert_close(am(x), torch.tensor([[11.5, -9.5]]))


def test_cp_factor_values():
    # R[p, q, a, b] = T[0, 0, a, b] · Wa[0, p] · Wb[0, q] for r = 1
    t = torch.tensor([[[[1.0, 2.0]]]])  # 1×1×(1×2)
    wa = torch.tensor([[1.0, -1.0]])  # out = 2
    wb = torch.tensor([[3.0]])  # in = 1
    want = torch.tensor([[[[3.0, 6.0]]], [[[-3.0, -6.0]]]])  # 2×1×1×2
    torch.testing.assert_close(cp_factor(t, wa, wb), want)


def test_conv2d_shapes_and_definition():
    net = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Conv2d(3, 2, 1))
    am = AdapterModel(net)
    am.add_adapter("a", LoHaConfig(r=2, target_modules=["0", "1"], use_effective_conv2d=True))
    c0, c1 = am.model[0].adapters["a"], am.model[1].adapters["a"]
    assert c0.hada_t1.shape == (2, 2, 3, 3) and c0.hada_w1_a.shape == (2, 3)
    assert not hasattr(c1, "hada_t1") and c1.hada_w1_b.shape == (2, 3)  # 1×1: plain form
    randomize(am.adapter_parameters("a"))
    d = am.deltas("a")["0.weight"]
    r1 = torch.einsum("uvab,up,vq->pqab", c0.hada_t1, c0.hada_w1_a, c0.hada_w1_b)
    r2 = torch.einsum("uvab,up,vq->pqab", c0.hada_t2, c0.hada_w2_a, c0.hada_w2_b)
    torch.testing.assert_close(d, r1 * r2 * (8 / 2))
    x = torch.randn(1, 2, 5, 5)
    with am.disabled():
        base = net(x)
    w0 = net[0].base_layer.weight + d
    w1 = net[1].base_layer.weight + am.deltas("a")["1.weight"]
    h = nn.functional.conv2d(x, w0, net[0].base_layer.bias)
    want = nn.functional.conv2d(h, w1, net[1].base_layer.bias)
    torch.testing.assert_close(am(x), want, atol=1e-5, rtol=0)
    assert not torch.allclose(base, want)


def test_dropouts_are_training_only():
    am = AdapterModel(_lin())
    am.add_adapter("a", LoHaConfig(r=1, target_modules=["0"], rank_dropout=0.5))
    am.eval()  # new modules start in training mode (nn.Module's default)
    loha = am.model[0].adapters["a"]
    _set(
        loha,
        hada_w1_a=[[1.0], [2.0]],
        hada_w1_b=[[1.0, 0.0, 1.0]],
        hada_w2_a=[[1.0], [-1.0]],
        hada_w2_b=[[2.0, 1.0, 0.0]],
    )
    x = torch.tensor([[1.0, 2.0, 3.0]])
    base = torch.tensor([[7.5, -1.5]])
    full = am(x) - base  # eval: no dropout; s = 8: ΔW x = [16, -32]
    torch.testing.assert_close(full, torch.tensor([[16.0, -32.0]]))
    am.train()
    torch.manual_seed(0)
    keep = (torch.rand(2) > 0.5).float()
    keep = keep / keep.mean()
    torch.manual_seed(0)
    torch.testing.assert_close(am(x) - base, full * keep)
    am.eval()
    am.add_adapter("m", LoHaConfig(r=1, target_modules=["0"], module_dropout=1.0))
    randomize(am.adapter_parameters("m"))
    am.set_active("m")
    am.eval()
    assert not torch.allclose(am(x), base)  # eval: applied
    am.train()
    torch.testing.assert_close(am(x), base)  # training, p = 1: always skipped


def test_fold_unfold_and_deltas():
    am = AdapterModel(tiny_llama())
    am.add_adapter("a", LoHaConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    randomize(am.adapter_parameters("a"), scale=0.3)
    fold_roundtrip(am, "a", logits(tiny_llama()))


def test_training_changes_only_loha():
    am = AdapterModel(tiny_llama())
    am.add_adapter("a", LoHaConfig(r=4))  # default targets: q_proj, v_proj
    t, _ = am.trainable_parameters()
    assert t == 2 * (2 * 4 * (32 + 32) + 2 * 4 * (16 + 32))
    train_lowers_loss(am, "a")


def test_bad_configs():
    with pytest.raises(AdapterConfigError, match="did you mean 'alpha'"):
        LoHaConfig.from_dict({"lora_alpha": 4})
    with pytest.raises(AdapterConfigError, match="'rank_dropout'"):
        LoHaConfig.from_dict({"rank_dropout": 1.0})
    with pytest.raises(AdapterConfigError, match="'r'"):
        LoHaConfig.from_dict({"r": -1})
    am = AdapterModel(nn.Sequential(nn.Embedding(4, 2)))
    with pytest.raises(AdapterConfigError, match="Embedding, which loha does not support"):
        am.add_adapter("a", LoHaConfig(target_modules=["0"]))


PEFT_CASES = {
    "llama-patterns": (
        "llama",
        dict(
            r=4,
            alpha=8,
            target_modules=["q_proj", "v_proj", "down_proj"],
            rank_pattern={"down_proj": 2},
            alpha_pattern={"layers.1.self_attn.q_proj": 3},
        ),
    ),
    "bert-cls-head": (
        "bert",
        dict(r=3, alpha=6, target_modules=["query", "value"], modules_to_save=["classifier"]),
    ),
}


@pytest.mark.parametrize("case", sorted(PEFT_CASES))
def test_peft_to_splice(case, tmp_path):
    kind, kw = PEFT_CASES[case]
    task = {"bert": "SEQ_CLS"}.get(kind, "CAUSAL_LM")
    peft_to_splice(kind, PeftLoHaConfig(task_type=task, **kw), tmp_path)


@pytest.mark.parametrize("case", sorted(PEFT_CASES))
def test_splice_to_peft(case, tmp_path):
    kind, kw = PEFT_CASES[case]
    splice_to_peft(kind, LoHaConfig(**kw), tmp_path)


@pytest.mark.parametrize("effective", [False, True])
def test_conv_peft_parity(effective, tmp_path):
    kw = dict(r=2, alpha=3, target_modules=["0", "2", "4"], use_effective_conv2d=effective)
    conv_peft_parity(PeftLoHaConfig(**kw), LoHaConfig(**kw), tmp_path)
