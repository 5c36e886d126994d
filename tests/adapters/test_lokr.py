"""LoKr: factorization, values against the definition, shape decisions, Conv2d, init modes,
fold/unfold, training, PEFT parity both ways."""

import pytest
import torch
from adapter_checks import conv_peft_parity, fold_roundtrip, train_lowers_loss
from peft import LoKrConfig as PeftLoKrConfig
from peft.tuners.lokr.layer import factorization as peft_factorization
from peft_parity import peft_to_splice, splice_to_peft
from tiny import logits, randomize, tiny_llama
from torch import nn

from splice.adapters import AdapterConfigError, AdapterModel
from splice.adapters.methods.lokr import LoKrConfig, factorization


def _set(m, **values):
    with torch.no_grad():
        for k, v in values.items():
            getattr(m, k).copy_(torch.tensor(v))


def test_factorization_values_and_peft_agreement():
    assert factorization(256) == (16, 16)
    assert factorization(128) == (8, 16)
    assert factorization(127) == (1, 127)
    assert factorization(48) == (6, 8)  # divisor pairs 1·48, 2·24, 3·16, 4·12, 6·8: nearest √48
    assert factorization(128, 4) == (4, 32)  # 4 divides 128
    assert factorization(36, 5) == (4, 9)  # 5 does not divide: largest divisor <= 5 is 4
    assert factorization(128, 32) == (32, 4)  # a dividing factor comes first, unsorted (PEFT)
    for dim in range(1, 130):
        for f in (-1, 1, 2, 3, 4, 5, 8, 16):
            assert factorization(dim, f) == peft_factorization(dim, f), (dim, f)


def test_linear_full_factors_kron_values():
    base = nn.Sequential(nn.Linear(4, 4, bias=False))
    with torch.no_grad():
        base[0].weight.copy_(torch.eye(4))
    am = AdapterModel(base)
    am.add_adapter("a", LoKrConfig(r=2, alpha=4, target_modules=["0"]))
    lokr = am.model[0].adapters["a"]
    # 4 = 2·2 both ways; r = 2 >= max(2, 2)/2: both factors full, 2×2
    assert lokr.lokr_w1.shape == (2, 2) and lokr.lokr_w2.shape == (2, 2)
    assert torch.equal(lokr.lokr_w1, torch.zeros(2, 2))  # init: ΔW = 0
    _set(lokr, lokr_w1=[[1.0, 2.0], [0.0, -1.0]], lokr_w2=[[1.0, 0.0], [1.0, 1.0]])
    # W1 ⊗ W2 = [[1·W2, 2·W2], [0·W2, -1·W2]]; s = 4/2 = 2
    want = 2 * torch.tensor(
        [[1.0, 0.0, 2.0, 0.0], [1.0, 1.0, 2.0, 2.0], [0.0, 0.0, -1.0, 0.0], [0.0, 0.0, -1.0, -1.0]]
    )
    torch.testing.assert_close(am.deltas("a")["0.weight"], want)
    # x = 1: I x + ΔW x = 1 + 2·[3, 6, -1, -2] = [7, 13, -1, -3]
    torch.testing.assert_close(am(torch.ones(1, 4)), torch.tensor([[7.0, 13.0, -1.0, -3.0]]))


def test_linear_low_rank_w2_values():
    am = AdapterModel(nn.Sequential(nn.Linear(8, 4)))
    am.add_adapter("a", LoKrConfig(r=1, alpha=1, target_modules=["0"]))
    lokr = am.model[0].adapters["a"]
    # out 4 = 2·2, in 8 = 2·4; r = 1 < max(2, 4)/2: W2 = W2a W2b (2×1 · 1×4); W1 full 2×2
    assert lokr.lokr_w1.shape == (2, 2)
    assert lokr.lokr_w2_a.shape == (2, 1) and lokr.lokr_w2_b.shape == (1, 4)
    _set(lokr, lokr_w1=[[1.0, 0.0], [0.0, 2.0]], lokr_w2_a=[[1.0], [2.0]])
    _set(lokr, lokr_w2_b=[[1.0, 0.0, 0.0, 1.0]])
    # W2 = [[1,0,0,1],[2,0,0,2]]; W1 ⊗ W2 = [[W2, 0], [0, 2·W2]]; s = 1
    want = torch.tensor(
        [
            [1.0, 0, 0, 1, 0, 0, 0, 0],
            [2.0, 0, 0, 2, 0, 0, 0, 0],
            [0.0, 0, 0, 0, 2, 0, 0, 2],
            [0.0, 0, 0, 0, 4, 0, 0, 4],
        ]
    )
    torch.testing.assert_close(am.deltas("a")["0.weight"], want)


def test_decompose_both_and_init_modes():
    am = AdapterModel(tiny_llama())
    am.add_adapter("a", LoKrConfig(r=1, decompose_both=True, target_modules=["q_proj"]))
    m = dict(am.named_adapter_modules("a"))["model.layers.0.self_attn.q_proj"]
    # 32 = 4·8 both ways: W1 4×4 -> 4×1·1×4 (1 < 2), W2 8×8 -> 8×1·1×8 (1 < 4)
    assert m.lokr_w1_a.shape == (4, 1) and m.lokr_w2_b.shape == (1, 8)
    assert torch.equal(m.lokr_w1_a, torch.zeros(4, 1))  # init True: W1a = 0
    assert m.lokr_w2_b.abs().sum() > 0
    am.add_adapter("b", LoKrConfig(r=1, init_weights="lycoris", target_modules=["q_proj"]))
    m = dict(am.named_adapter_modules("b"))["model.layers.0.self_attn.q_proj"]
    assert torch.equal(m.lokr_w2_b, torch.zeros(1, 8)) and m.lokr_w1.abs().sum() > 0
    am.add_adapter("c", LoKrConfig(r=1, init_weights=False, target_modules=["q_proj"]))
    for n in ("a", "b"):
        assert all(d.abs().max() == 0 for d in am.deltas(n).values())
    assert all(d.abs().max() > 0 for d in am.deltas("c").values())


def test_conv2d_definition():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(4, 6, 3))
    am = AdapterModel(net)
    am.add_adapter("a", LoKrConfig(r=1, target_modules=["0"], use_effective_conv2d=True))
    m = net[0].adapters["a"]
    # out 6 = 2·3, in 4 = 2·2; r = 1 < 3/2: W2 in CP form, T2 1×1×3×3
    assert m.lokr_w1.shape == (2, 2) and m.lokr_t2.shape == (1, 1, 3, 3)
    randomize(am.adapter_parameters("a"))
    w2 = torch.einsum("uvab,up,vq->pqab", m.lokr_t2, m.lokr_w2_a, m.lokr_w2_b)  # 3×2×3×3
    want = torch.zeros(6, 4, 3, 3)
    for i in range(2):
        for k in range(2):
            want[i * 3 : (i + 1) * 3, k * 2 : (k + 1) * 2] = m.lokr_w1[i, k] * w2
    torch.testing.assert_close(am.deltas("a")["0.weight"], want * 8.0)  # s = 8/1


def test_fold_unfold_and_deltas():
    am = AdapterModel(tiny_llama())
    am.add_adapter("a", LoKrConfig(r=2, target_modules=["q_proj", "v_proj", "down_proj"]))
    randomize(am.adapter_parameters("a"), scale=0.3)
    fold_roundtrip(am, "a", logits(tiny_llama()))


def test_rank_dropout_scale_and_module_dropout():
    am = AdapterModel(nn.Sequential(nn.Linear(4, 4, bias=False)))
    am.add_adapter("a", LoKrConfig(r=2, target_modules=["0"], rank_dropout=0.5))
    am.add_adapter(
        "b", LoKrConfig(r=2, target_modules=["0"], rank_dropout=0.5, rank_dropout_scale=True)
    )
    randomize(am.adapter_parameters("a"))
    randomize(am.adapter_parameters("b"))
    x = torch.ones(1, 4)
    with am.disabled():
        base = am(x)
    for name, scale in (("a", False), ("b", True)):
        am.set_active(name)
        am.eval()
        full = am(x) - base
        am.train()
        torch.manual_seed(5)
        keep = (torch.rand(4) > 0.5).float()  # seed 5: [1, 0, 1, 1]
        if scale:
            keep = keep / keep.mean()  # mean 0.75: kept rows × 4/3
        torch.manual_seed(5)
        torch.testing.assert_close(am(x) - base, full * keep)
        torch.manual_seed(3)  # seed 3 drops all 4 rows: no update (PEFT's 1/mean gives NaN)
        torch.testing.assert_close(am(x), base)


def test_training_changes_only_lokr():
    am = AdapterModel(tiny_llama())
    am.add_adapter("a", LoKrConfig(r=2, module_dropout=0.1))
    train_lowers_loss(am, "a")


def test_bad_configs():
    with pytest.raises(AdapterConfigError, match="did you mean 'decompose_both'"):
        LoKrConfig.from_dict({"decompose_bth": True})
    with pytest.raises(AdapterConfigError, match="decompose_factor must be -1"):
        LoKrConfig.from_dict({"decompose_factor": 0})
    with pytest.raises(AdapterConfigError, match="init_weights"):
        LoKrConfig.from_dict({"init_weights": "gaussian"})
    am = AdapterModel(nn.Sequential(nn.Conv1d(2, 2, 3)))
    with pytest.raises(AdapterConfigError, match="Conv1d, which lokr does not support"):
        am.add_adapter("a", LoKrConfig(target_modules=["0"]))


PEFT_CASES = {
    "llama-full": ("llama", dict(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])),
    "llama-decompose-patterns": (
        "llama",
        dict(
            r=2,
            alpha=200,  # W1a W1b ⊗ W2a W2b of 0.1-scale factors is ~1e-4: scale it up
            decompose_both=True,
            decompose_factor=4,
            target_modules=["q_proj", "k_proj", "up_proj"],
            rank_pattern={"up_proj": 1},
            alpha_pattern={"layers.1.self_attn.q_proj": 5},
        ),
    ),
    "bert-cls-head": (
        "bert",
        dict(r=1, target_modules=["query", "value"], modules_to_save=["classifier"]),
    ),
}


@pytest.mark.parametrize("case", sorted(PEFT_CASES))
def test_peft_to_splice(case, tmp_path):
    kind, kw = PEFT_CASES[case]
    task = {"bert": "SEQ_CLS"}.get(kind, "CAUSAL_LM")
    peft_to_splice(kind, PeftLoKrConfig(task_type=task, **kw), tmp_path)


@pytest.mark.parametrize("case", sorted(PEFT_CASES))
def test_splice_to_peft(case, tmp_path):
    kind, kw = PEFT_CASES[case]
    splice_to_peft(kind, LoKrConfig(**kw), tmp_path)


@pytest.mark.parametrize("r,effective", [(1, False), (1, True), (4, False)])
def test_conv_peft_parity(r, effective, tmp_path):
    kw = dict(r=r, alpha=2, target_modules=["0", "2", "4"], use_effective_conv2d=effective)
    conv_peft_parity(PeftLoKrConfig(**kw), LoKrConfig(**kw), tmp_path)
