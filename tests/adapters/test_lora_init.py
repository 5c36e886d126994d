"""LoRA initialisations: gaussian, PiSSA (full and fast SVD), OLoRA — values, the base
rewrite W_res = W − s·BA, PEFT parity, and saving (as is, and as a rank-2r LoRA)."""

import json

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from tiny import logits, tiny_llama
from torch import nn

from splice.adapters import (
    AdapterConfigError,
    AdapterModel,
    LoraConfig,
    load_adapter_model,
    save_adapter,
    save_as_lora,
)


def _one_linear(w, init, r=1, alpha=2):
    base = nn.Sequential(nn.Linear(2, 2, bias=False))
    with torch.no_grad():
        base[0].weight.copy_(w)
    am = AdapterModel(base)
    am.add_adapter(
        "p", LoraConfig(r=r, lora_alpha=alpha, init_lora_weights=init, target_modules=["0"])
    )
    return am, am.model[0].adapters["p"]


def test_pissa_values_2x2():
    w = torch.tensor([[3.0, 0.0], [0.0, 1.0]])
    am, lora = _one_linear(w, "pissa")
    # SVD: U = V = I, S = [3, 1]; r = 1, s = 2/1: S_r/s = 1.5
    # A = √1.5 · [1, 0], B = [1, 0]ᵀ · √1.5 (signs of U, V may flip together)
    r15 = 1.5**0.5
    torch.testing.assert_close(lora.lora_A.weight.abs(), torch.tensor([[r15, 0.0]]))
    torch.testing.assert_close(lora.lora_B.weight.abs(), torch.tensor([[r15], [0.0]]))
    # s·BA = 2 · 1.5 · e1 e1ᵀ = [[3, 0], [0, 0]]; W_res = W − s·BA = [[0, 0], [0, 1]]
    torch.testing.assert_close(
        am.model[0].base_layer.weight, torch.tensor([[0.0, 0.0], [0.0, 1.0]])
    )
    torch.testing.assert_close(am.deltas("p")["0.weight"], torch.tensor([[3.0, 0.0], [0.0, 0.0]]))
    # base + ΔW reproduces W: the adapted layer computes W x at init
    x = torch.tensor([[1.0, 2.0]])
    torch.testing.assert_close(am(x), torch.tensor([[3.0, 2.0]]))


def test_olora_values_2x2():
    w = torch.tensor([[3.0, 4.0], [0.0, 5.0]])
    am, lora = _one_linear(w, "olora", alpha=1)
    # QR: Q[:, 0] = ±[1, 0], R[0] = ±[3, 4]; A = R[:1], B = Q[:, :1]; s = 1
    torch.testing.assert_close(lora.lora_A.weight.abs(), torch.tensor([[3.0, 4.0]]))
    torch.testing.assert_close(lora.lora_B.weight.abs(), torch.tensor([[1.0], [0.0]]))
    # W_res = W − BA = [[0, 0], [0, 5]]
    torch.testing.assert_close(
        am.model[0].base_layer.weight, torch.tensor([[0.0, 0.0], [0.0, 5.0]])
    )


def test_pissa_fast_svd_approximates_top_r():
    torch.manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(8, 8))
    w = u[:, :3] @ torch.diag(torch.tensor([5.0, 3.0, 2.0])) @ u[:, 3:6].T  # rank 3
    base = nn.Sequential(nn.Linear(8, 8, bias=False))
    with torch.no_grad():
        base[0].weight.copy_(w)
    am = AdapterModel(base)
    am.add_adapter("p", LoraConfig(r=3, init_lora_weights="pissa_niter_4", target_modules=["0"]))
    d = am.deltas("p")["0.weight"]
    torch.testing.assert_close(d, w, atol=1e-4, rtol=0)  # rank-3 W: the top-3 part is W
    torch.testing.assert_close(am.model[0].base_layer.weight + d, w, atol=1e-5, rtol=0)


def test_gaussian_init_std():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(400, 400, bias=False))
    am = AdapterModel(base)
    am.add_adapter("g", LoraConfig(r=4, init_lora_weights="gaussian", target_modules=["0"]))
    lora = am.model[0].adapters["g"]
    assert abs(lora.lora_A.weight.std().item() - 1 / 4) < 0.01  # PEFT: std = 1/r
    assert torch.count_nonzero(lora.lora_B.weight) == 0


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_matches_peft_init(init):
    targets = ["q_proj", "v_proj"]
    pm = get_peft_model(
        tiny_llama(), PeftLoraConfig(r=4, init_lora_weights=init, target_modules=targets)
    )
    am = AdapterModel(tiny_llama())
    am.add_adapter("default", LoraConfig(r=4, init_lora_weights=init, target_modules=targets))
    peft_sd = {k.removeprefix("base_model.model."): v for k, v in pm.state_dict().items()}
    for k, v in am.model.state_dict().items():
        pk = k.replace(".adapters.default.", ".").replace(".lora_A.", ".lora_A.default.")
        pk = pk.replace(".lora_B.", ".lora_B.default.")
        if ".base_layer." in k or ".lora_" in k:
            torch.testing.assert_close(v, peft_sd[pk], atol=1e-5, rtol=0, msg=k)
    torch.testing.assert_close(logits(am), logits(tiny_llama()), atol=1e-5, rtol=0)


def _trained_pissa(init="pissa"):
    am = AdapterModel(tiny_llama())
    am.add_adapter(
        "default",
        LoraConfig(r=2, lora_alpha=4, init_lora_weights=init, target_modules=["q_proj", "v_proj"]),
    )
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # "training": move A and B away from their init
        for p in am.adapter_parameters("default"):
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return am, logits(am)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_saved_as_is_reloads_on_original_base(init, tmp_path):
    am, want = _trained_pissa(init)
    save_adapter(am, tmp_path / "a")
    assert (
        json.loads((tmp_path / "a" / "adapter_config.json").read_text())["init_lora_weights"]
        == init
    )
    # splice and PEFT rerun the initialisation on the original base, then load A, B
    got = logits(load_adapter_model(tiny_llama(), tmp_path / "a"))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    pm = PeftModel.from_pretrained(tiny_llama(), tmp_path / "a")
    torch.testing.assert_close(logits(pm), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_save_as_lora_rank_2r(init, tmp_path):
    am, want = _trained_pissa(init)
    save_as_lora(am, tmp_path / "c")
    cfg = json.loads((tmp_path / "c" / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["init_lora_weights"]) == (4, 8, True)
    torch.testing.assert_close(
        logits(load_adapter_model(tiny_llama(), tmp_path / "c")), want, atol=1e-5, rtol=0
    )
    pm = PeftModel.from_pretrained(tiny_llama(), tmp_path / "c")
    torch.testing.assert_close(logits(pm), want, atol=1e-5, rtol=0)
    assert (want - logits(tiny_llama())).abs().max() > 1e-3


def test_peft_converted_pissa_loads_in_splice(tmp_path):
    pm = get_peft_model(
        tiny_llama(), PeftLoraConfig(r=2, init_lora_weights="pissa", target_modules=["q_proj"])
    )
    pm.save_pretrained(tmp_path / "init")
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.add_(0.05)
    want = logits(pm)
    pm.save_pretrained(
        tmp_path / "conv", path_initial_model_for_weight_conversion=tmp_path / "init"
    )
    torch.testing.assert_close(
        logits(load_adapter_model(tiny_llama(), tmp_path / "conv")), want, atol=1e-5, rtol=0
    )


def test_init_errors():
    with pytest.raises(AdapterConfigError, match="init_lora_weights='pisa'"):
        LoraConfig.from_dict({"init_lora_weights": "pisa"})
    with pytest.raises(AdapterConfigError, match="lora_bias=True needs init_lora_weights"):
        LoraConfig.from_dict({"init_lora_weights": "pissa", "lora_bias": True})
    am = AdapterModel(tiny_llama())
    with pytest.raises(AdapterConfigError, match=r"not supported on an nn\.Embedding"):
        am.add_adapter("e", LoraConfig(init_lora_weights="olora", target_modules=["embed_tokens"]))
    am.add_adapter("plain", LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(AdapterConfigError, match="no PiSSA/OLoRA initial factors"):
        save_as_lora(am, "/nonexistent/x", "plain")
