"""VeRA: values against the definition, shared projections, PRNG reproduction, fold/unfold,
training, PEFT parity both ways (with and without saved projections)."""

import json
import math

import pytest
import torch
from adapter_checks import fold_roundtrip, train_lowers_loss
from peft import VeraConfig as PeftVeraConfig
from peft_parity import peft_to_splice, splice_to_peft
from safetensors.torch import load_file
from tiny import logits, randomize, tiny_gpt2, tiny_llama
from torch import nn

from splice.adapters import AdapterConfigError, AdapterModel, AdapterStateError, save_adapter
from splice.adapters.methods.vera import VeraConfig, vera_projections
from splice.adapters.peft_format import load_adapter_model


def _net():
    net = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 4))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, -1.0]]))
        net[0].bias.copy_(torch.tensor([0.5, -0.5]))
    return net


def test_update_is_lambda_b_B_lambda_d_A_x():
    am = AdapterModel(_net())
    am.add_adapter("a", VeraConfig(r=2, target_modules=["0", "1"]))
    v0, v1 = am.model[0].adapters["a"], am.model[1].adapters["a"]
    assert v0.projections is v1.projections  # one shared pair
    proj = v0.projections
    assert proj.vera_A.shape == (2, 3) and proj.vera_B.shape == (4, 2)  # largest in 3, out 4
    with torch.no_grad():
        proj.vera_A.copy_(torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]))
        proj.vera_B.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0], [0.0, 0.0]]))
        v0.vera_lambda_d.copy_(torch.tensor([1.0, 2.0]))
        v0.vera_lambda_b.copy_(torch.tensor([3.0, -1.0]))
    # layer 0 uses A[:, :3] and B[:2]: Λ_d A = [[1,0,1],[0,2,0]]; B' Λ_d A = [[1,0,1],[0,4,0]];
    # Λ_b (.) = [[3,0,3],[0,-4,0]]
    want = torch.tensor([[3.0, 0.0, 3.0], [0.0, -4.0, 0.0]])
    torch.testing.assert_close(am.deltas("a")["0.weight"], want)
    # layer 1 still has λ_b = 0 (init): no delta
    assert am.deltas("a")["1.weight"].abs().max() == 0
    x = torch.tensor([[1.0, 2.0, 3.0]])
    # layer 0: base [7.5, -1.5] + ΔW x = [3+9, -8] = [12, -8] -> [19.5, -9.5]
    with torch.no_grad():
        h = am.model[0](x)
    torch.testing.assert_close(h, torch.tensor([[19.5, -9.5]]))
    # layer 1 slices A[:, :2] = [[1,0],[0,1]] and B[:4]; with λ_d = [1,1], λ_b = [1,1,1,1]:
    # ΔW1 = B @ A[:, :2] = B = [[1,0],[0,2],[1,1],[0,0]]
    with torch.no_grad():
        v1.vera_lambda_d.fill_(1.0)
        v1.vera_lambda_b.fill_(1.0)
    torch.testing.assert_close(
        am.deltas("a")["1.weight"], torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0], [0.0, 0.0]])
    )


def test_init_and_prng_reproduction():
    am = AdapterModel(_net())
    am.add_adapter("a", VeraConfig(r=2, target_modules=["0", "1"], projection_prng_key=7))
    v0 = am.model[0].adapters["a"]
    assert torch.equal(v0.vera_lambda_b, torch.zeros(2))
    assert torch.allclose(v0.vera_lambda_d, torch.full((2,), 0.1))
    # A then B from one generator seeded with the key; bound √(6/fan_in)
    g = torch.Generator().manual_seed(7)
    a = torch.empty(2, 3).uniform_(-math.sqrt(6 / 3), math.sqrt(6 / 3), generator=g)
    b = torch.empty(4, 2).uniform_(-math.sqrt(6 / 2), math.sqrt(6 / 2), generator=g)
    assert torch.equal(v0.projections.vera_A, a)
    assert torch.equal(v0.projections.vera_B, b)
    a2, b2 = vera_projections(2, 4, 3, 7)
    assert torch.equal(a2, a) and torch.equal(b2, b)
    # and PEFT's own generator gives the same
    from peft.tuners.vera.model import _kaiming_init

    g = torch.Generator().manual_seed(7)
    assert torch.equal(_kaiming_init((2, 3), generator=g), a)
    assert torch.equal(_kaiming_init((4, 2), generator=g), b)


def test_saved_keys(tmp_path):
    am = AdapterModel(tiny_llama())
    am.add_adapter("a", VeraConfig(r=4, target_modules=["q_proj", "down_proj"]))
    save_adapter(am, tmp_path / "with", "a")
    keys = set(load_file(tmp_path / "with" / "adapter_model.safetensors"))
    assert {"base_model.vera_A", "base_model.vera_B"} <= keys
    assert "base_model.model.model.layers.0.self_attn.q_proj.vera_lambda_b" in keys
    assert len(keys) == 2 + 2 * 2 * 2
    w = load_file(tmp_path / "with" / "adapter_model.safetensors")
    assert w["base_model.vera_A"].shape == (4, 48) and w["base_model.vera_B"].shape == (32, 4)
    am.add_adapter("b", VeraConfig(r=4, target_modules=["q_proj"], save_projection=False))
    save_adapter(am, tmp_path / "without", "b")
    keys = set(load_file(tmp_path / "without" / "adapter_model.safetensors"))
    assert not any("vera_A" in k or "vera_B" in k for k in keys) and len(keys) == 4


def test_missing_projection_is_clear_error(tmp_path):
    am = AdapterModel(tiny_llama())
    am.add_adapter("default", VeraConfig(r=4, target_modules=["q_proj"]))
    save_adapter(am, tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    w = load_file(tmp_path / "a" / "adapter_model.safetensors")
    from safetensors.torch import save_file

    save_file(
        {k: v for k, v in w.items() if "vera_B" not in k},
        tmp_path / "a" / "adapter_model.safetensors",
    )
    assert cfg["save_projection"] is True
    with pytest.raises(AdapterStateError, match="vera_B"):
        load_adapter_model(tiny_llama(), tmp_path / "a")


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_fold_unfold_and_deltas(kind):
    factory = {"llama": tiny_llama, "gpt2": tiny_gpt2}[kind]
    am = AdapterModel(factory())
    am.add_adapter("a", VeraConfig(r=8, target_modules="all-linear"))
    randomize(am.adapter_parameters("a"), scale=0.5)
    fold_roundtrip(am, "a", logits(factory()))


def test_training_changes_only_lambdas():
    am = AdapterModel(tiny_llama())
    am.add_adapter("a", VeraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    proj = next(iter(am.named_adapter_modules("a")))[1].projections
    a0 = proj.vera_A.clone()
    t, _ = am.trainable_parameters()
    assert t == 2 * ((32 + 8) + (16 + 8))  # λ_b (out) + λ_d (r) per layer
    train_lowers_loss(am, "a")
    assert torch.equal(proj.vera_A, a0)


def test_bad_configs():
    with pytest.raises(AdapterConfigError, match="did you mean 'projection_prng_key'"):
        VeraConfig.from_dict({"projection_prng_kye": 1})
    with pytest.raises(AdapterConfigError, match="'bias'"):
        VeraConfig.from_dict({"bias": "all"})
    with pytest.raises(AdapterConfigError, match="'r'"):
        VeraConfig.from_dict({"r": 0})
    am = AdapterModel(nn.Sequential(nn.Conv2d(2, 2, 1)))
    with pytest.raises(AdapterConfigError, match="Conv2d, which vera does not support"):
        am.add_adapter("a", VeraConfig(target_modules=["0"]))


PEFT_CASES = {
    "llama-attn-mlp": ("llama", dict(r=8, target_modules=["q_proj", "v_proj", "down_proj"])),
    "llama-no-projection": (
        "llama",
        dict(
            r=4, target_modules=["k_proj", "up_proj"], save_projection=False, projection_prng_key=3
        ),
    ),
    "gpt2-conv1d": ("gpt2", dict(r=8, target_modules=["c_attn", "c_fc"], d_initial=0.2)),
    "bert-cls-head": (
        "bert",
        dict(r=6, target_modules=["query", "value"], modules_to_save=["classifier"]),
    ),
}


@pytest.mark.parametrize("case", sorted(PEFT_CASES))
def test_peft_to_splice(case, tmp_path):
    kind, kw = PEFT_CASES[case]
    task = {"bert": "SEQ_CLS"}.get(kind, "CAUSAL_LM")
    extra = {"fan_in_fan_out": True} if kind == "gpt2" else {}
    peft_to_splice(kind, PeftVeraConfig(task_type=task, **kw, **extra), tmp_path)


@pytest.mark.parametrize("case", sorted(PEFT_CASES))
def test_splice_to_peft(case, tmp_path):
    kind, kw = PEFT_CASES[case]
    splice_to_peft(kind, VeraConfig(**kw), tmp_path)


def test_saved_projection_wins_over_key(tmp_path):
    """With save_projection the saved A, B are used even when the key would give others."""
    am = AdapterModel(tiny_llama())
    am.add_adapter("default", VeraConfig(r=4, target_modules=["q_proj"]))
    randomize(am.adapter_parameters("default"))
    proj = next(iter(am.named_adapter_modules("default")))[1].projections
    with torch.no_grad():
        proj.vera_A.mul_(-2.0)  # no longer what key 0 generates
    want = logits(am)
    save_adapter(am, tmp_path / "a")
    from peft import PeftModel

    torch.testing.assert_close(logits(load_adapter_model(tiny_llama(), tmp_path / "a")), want)
    pm = PeftModel.from_pretrained(tiny_llama(), tmp_path / "a").eval()
    torch.testing.assert_close(logits(pm), want, atol=1e-5, rtol=0)
