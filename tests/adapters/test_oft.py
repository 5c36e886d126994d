"""OFT: values against the definition, coft / block_share / dropout, fold/unfold, training,
PEFT parity both ways."""

import pytest
import torch
from fold_train_checks import check_fold, check_training
from peft import OFTConfig as PeftOFTConfig
from peft_parity import peft_to_splice, splice_to_peft
from tiny import logits, randomize, tiny_bert_cls, tiny_gpt2, tiny_llama
from torch import nn

from splice.adapters import AdapterConfigError, AdapterModel, OFTConfig
from splice.adapters.methods.oft import (
    adjust_to_divisor,
    cayley,
    coft_project,
    multiplicative_dropout,
    skew_symmetric,
)

W = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.0, 1.0, 0.0, -1.0]])


def _oft_linear(**kw):
    base = nn.Sequential(nn.Linear(4, 2, bias=False))
    with torch.no_grad():
        base[0].weight.copy_(W)
    am = AdapterModel(base)
    am.add_adapter("a", OFTConfig(target_modules=["0"], r=0, oft_block_size=2, **kw))
    oft = am.model[0].adapters["a"]
    with torch.no_grad():  # block 1: Q = [[0, .5], [-.5, 0]]; block 2: Q = 0 (R = I)
        oft.oft_R.weight.copy_(torch.tensor([[0.5], [0.0]]))
    return am, oft


def test_exact_cayley_rotates_the_input():
    am, oft = _oft_linear(use_cayley_neumann=False)
    # R1 = (I − Q)(I + Q)⁻¹ = [[1,−.5],[.5,1]] · [[.8,−.4],[.4,.8]] = [[.6,−.8],[.8,.6]]
    r1 = torch.tensor([[0.6, -0.8], [0.8, 0.6]])
    torch.testing.assert_close(oft.rotation()[:2, :2], r1)
    torch.testing.assert_close(oft.rotation()[2:, 2:], torch.eye(2))
    # x = [1,2,3,4]: block 1 (row vector) [1,2]·R1 = [.6+1.6, −.8+1.2] = [2.2, .4]
    # x' = [2.2, .4, 3, 4];  W x' = [2.2+.8+9+16, .4−4] = [28, −3.6]
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    torch.testing.assert_close(am(x), torch.tensor([[28.0, -3.6]]))
    # ΔW = W R_bdᵀ − W
    rbd = torch.block_diag(r1, torch.eye(2))
    torch.testing.assert_close(am.deltas("a")["0.weight"], W @ rbd.T - W)


def test_neumann_series_five_terms():
    am, oft = _oft_linear()  # PEFT's default: use_cayley_neumann, 5 terms
    # Q² = −.25 I, Q³ = −.25 Q, Q⁴ = .0625 I:  I + 2Q + 2Q² + 2Q³ + Q⁴ = .5625 I + 1.5 Q
    r1 = torch.tensor([[0.5625, 0.75], [-0.75, 0.5625]])
    torch.testing.assert_close(oft.rotation()[:2, :2], r1)
    # [1,2]·R1 = [.5625−1.5, .75+1.125] = [−.9375, 1.875]; W x' = [−.9375+3.75+25, 1.875−4]
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    torch.testing.assert_close(am(x), torch.tensor([[27.8125, -2.125]]))


def test_series_lengths_and_orthogonality():
    q = skew_symmetric(torch.tensor([[0.5]]), 2)
    eye = torch.eye(2).unsqueeze(0)
    torch.testing.assert_close(cayley(q, True, 1), eye)
    torch.testing.assert_close(cayley(q, True, 2), eye + 2 * q)
    # terms 3 and 4 are the same series in PEFT: I + 2Q + 2Q² + Q³
    three = eye + 2 * q + 2 * q @ q + q @ q @ q
    torch.testing.assert_close(cayley(q, True, 3), three)
    torch.testing.assert_close(cayley(q, True, 4), three)
    g = torch.Generator().manual_seed(0)
    big = skew_symmetric(torch.randn(3, 6, generator=g), 4)
    assert big.shape == (3, 4, 4)
    torch.testing.assert_close(big, -big.transpose(-2, -1))
    r = cayley(big, neumann=False)
    torch.testing.assert_close(r @ r.transpose(-2, -1), torch.eye(4).expand(3, 4, 4))


def test_coft_projects_each_block():
    # two rows -> bound = eps/√2 = .7071 (eps = 1); ‖Q‖_F = √2·|v| for a 2×2 block:
    # v = 3: ‖Q‖ = 4.243 > bound -> v·bound/‖Q‖ = .5;  v = .1: ‖Q‖ = .141 -> unchanged
    out = coft_project(torch.tensor([[3.0], [0.1]]), 2, 1.0)
    torch.testing.assert_close(out, torch.tensor([[0.5], [0.1]]))
    am, oft = _oft_linear(coft=True, eps=1.0)
    with torch.no_grad():
        oft.oft_R.weight.copy_(torch.tensor([[3.0], [0.1]]))
    am(torch.ones(1, 4))  # as PEFT: the forward writes the projection into the parameter
    torch.testing.assert_close(oft.oft_R.weight.detach(), torch.tensor([[0.5], [0.1]]))


def test_block_share_and_layout():
    am = AdapterModel(nn.Sequential(nn.Linear(6, 3)))
    am.add_adapter("a", OFTConfig(target_modules=["0"], r=3, oft_block_size=0, block_share=True))
    oft = am.model[0].adapters["a"]
    assert oft.oft_R.weight.shape == (1, 1)  # one shared 2×2 block (k(k−1)/2 = 1)
    with torch.no_grad():
        oft.oft_R.weight.fill_(0.5)
    rot = oft.rotation()
    for j in range(3):
        torch.testing.assert_close(rot[2 * j : 2 * j + 2, 2 * j : 2 * j + 2], rot[:2, :2])
    # PEFT's divisor fix-up: 32 on 48 -> 24 (|32−24| = 8 < |48−32|); 5 on 6 -> 6; 40 on 32 -> 32
    assert adjust_to_divisor(48, 32) == 24
    assert adjust_to_divisor(6, 5) == 6
    assert adjust_to_divisor(32, 40) == 32
    am = AdapterModel(tiny_llama())
    with pytest.warns(UserWarning, match="using 24"):
        am.add_adapter("a", OFTConfig(target_modules=["down_proj"]))  # in_features 48
    mod = dict(am.named_adapter_modules("a"))["model.layers.0.mlp.down_proj"]
    assert (mod.blocks, mod.block_size) == (2, 24)


def test_module_dropout_replaces_blocks_by_identity_in_training():
    blocks = torch.full((4, 2, 2), 7.0)
    out = multiplicative_dropout(blocks, 0.5)  # ⌊.5·4⌋ = 2 blocks become I
    is_eye = [torch.equal(b, torch.eye(2)) for b in out]
    assert sum(is_eye) == 2 and all(torch.equal(b, blocks[0]) for b, e in zip(out, is_eye) if not e)
    am, _ = _oft_linear(module_dropout=0.5)
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    ref = am(x)  # eval: no dropout
    am.train()
    torch.manual_seed(0)
    outs = {tuple(am(x)[0].tolist()) for _ in range(20)}
    # one of the two blocks is identity each time: block 1 dropped gives W x, else ref
    assert outs <= {tuple(ref[0].tolist()), (30.0, -2.0)} and len(outs) == 2


def test_init_identity_fold_unfold_and_conv1d():
    ref = logits(tiny_llama())
    am = AdapterModel(tiny_llama())
    am.add_adapter(
        "a", OFTConfig(target_modules=["q_proj", "v_proj", "down_proj"], r=4, oft_block_size=0)
    )
    torch.testing.assert_close(logits(am), ref)  # Q = 0 -> R = I
    randomize(am.adapter_parameters("a"), scale=0.3)
    check_fold(am, "a", ref)
    ref2 = logits(tiny_gpt2())  # Conv1D (splice only): W stored in×out, ΔW = (R − I) W
    am = AdapterModel(tiny_gpt2())
    am.add_adapter("a", OFTConfig(target_modules=["c_attn", "c_fc"], oft_block_size=8))
    randomize(am.adapter_parameters("a"), scale=0.3)
    check_fold(am, "a", ref2)


def test_training_changes_only_oft():
    am = AdapterModel(tiny_llama())
    am.add_adapter(
        "a", OFTConfig(target_modules=["q_proj", "v_proj", "down_proj"], oft_block_size=8)
    )
    check_training(am, "a")


def test_bad_configs():
    with pytest.raises(AdapterConfigError, match="exactly one of r"):
        OFTConfig.from_dict({"r": 4, "oft_block_size": 8})
    with pytest.raises(AdapterConfigError, match="exactly one of r"):
        OFTConfig(r=0, oft_block_size=0)
    with pytest.raises(AdapterConfigError, match="did you mean 'block_share'"):
        OFTConfig.from_dict({"block_shar": True})
    with pytest.raises(AdapterConfigError, match="'eps'"):
        OFTConfig.from_dict({"eps": 0})
    am = AdapterModel(tiny_llama())
    with pytest.raises(AdapterConfigError, match="Embedding, which oft does not support"):
        am.add_adapter("a", OFTConfig(target_modules=["embed_tokens"]))
    with pytest.raises(AdapterConfigError, match="leaves nothing to rotate"):
        am.add_adapter("a", OFTConfig(target_modules=["q_proj"], r=32, oft_block_size=0))


PEFT_CASES = {
    "llama-qv-mlp-random": (
        "llama",
        dict(
            target_modules=["q_proj", "v_proj", "down_proj"], oft_block_size=8, init_weights=False
        ),
    ),
    "llama-shared-exact-cayley": (
        "llama",
        dict(
            target_modules=["q_proj", "up_proj"],
            r=4,
            oft_block_size=0,
            block_share=True,
            use_cayley_neumann=False,
        ),
    ),
    "llama-coft-7terms": (
        "llama",
        dict(
            target_modules=["k_proj", "down_proj"],
            oft_block_size=16,
            coft=True,
            eps=0.5,
            num_cayley_neumann_terms=7,
        ),
    ),
    "llama-default-block-adjusted": ("llama", dict(target_modules=["gate_proj", "down_proj"])),
    "bert-qv-head": (
        "bert",
        dict(target_modules=["query", "value"], oft_block_size=16, modules_to_save=["classifier"]),
    ),
}


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("case", sorted(PEFT_CASES))
def test_peft_to_splice(case, tmp_path):
    kind, kw = PEFT_CASES[case]
    task = {"bert": "SEQ_CLS"}.get(kind, "CAUSAL_LM")
    peft_to_splice(kind, PeftOFTConfig(task_type=task, **kw), tmp_path)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("case", sorted(PEFT_CASES))
def test_splice_to_peft(case, tmp_path):
    kind, kw = PEFT_CASES[case]
    splice_to_peft(kind, OFTConfig(**kw), tmp_path)


def test_default_targets():
    am = AdapterModel(tiny_bert_cls())
    am.add_adapter("a", OFTConfig(oft_block_size=8))
    assert {p.rsplit(".", 1)[1] for p, _ in am.named_adapter_modules("a")} == {"query", "value"}
