"""PEFT's dtype rule on a bfloat16 base (see `splice.adapters.layer`): the adapter keeps
float32 parameters, computes in float32 and the layer rounds its output to bf16 once. The
same computation as PEFT's, so the logits are bit-identical to PEFT's (not just close), for
every weight-space adapter type, on Linear, GPT-2 Conv1D, Embedding and Conv2d layers."""

from __future__ import annotations

import peft
import pytest
import torch
from adapter_checks import conv_net
from tiny import FACTORIES, logits, randomize

from splice.adapters import (
    AdapterModel,
    load_adapter,
    load_adapter_model,
    make_config,
    save_adapter,
)

BF16 = torch.bfloat16


def _llama_cases():
    q = ["q_proj"]
    return {
        "lora": peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "gate_proj"]),
        "lora-embedding": peft.LoraConfig(r=4, target_modules=["embed_tokens", "k_proj"]),
        "dora": peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], use_dora=True),
        "dora-embedding": peft.LoraConfig(r=4, target_modules=["embed_tokens"], use_dora=True),
        "ia3": peft.IA3Config(
            target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]
        ),
        "hra": peft.HRAConfig(r=4, target_modules=["q_proj", "o_proj"]),
        "hra-gs": peft.HRAConfig(r=4, target_modules=q, apply_GS=True),
        "oft": peft.OFTConfig(r=4, oft_block_size=0, target_modules=q),
        "vera": peft.VeraConfig(r=4, target_modules=["q_proj", "v_proj"]),
        "loha": peft.LoHaConfig(r=4, target_modules=q),
        "lokr": peft.LoKrConfig(r=4, target_modules=q),
    }


def _gpt2_cases():
    return {
        "lora": peft.LoraConfig(r=4, target_modules=["c_attn", "wte"]),
        "dora": peft.LoraConfig(r=4, target_modules=["c_attn"], use_dora=True),
        "ia3": peft.IA3Config(target_modules=["c_attn", "c_proj"], feedforward_modules=["c_proj"]),
    }


def _conv_cases():
    two = ["0", "2"]
    return {
        "lora": peft.LoraConfig(r=2, target_modules=two),
        "dora": peft.LoraConfig(r=2, target_modules=two, use_dora=True),
        "ia3": peft.IA3Config(target_modules=two, feedforward_modules=["2"]),
        "loha": peft.LoHaConfig(r=2, target_modules=two),
        "lokr": peft.LoKrConfig(r=2, target_modules=two),
    }


def _bf16_model(kind: str):
    model = conv_net() if kind == "conv" else FACTORIES[kind](0)
    return model.to(BF16)


@torch.no_grad()
def _outputs(model, kind: str) -> torch.Tensor:
    if kind == "conv":
        x = torch.randn(2, 4, 5, 5, generator=torch.Generator().manual_seed(1))
        return model(x.to(BF16))
    return logits(model)


CASES = (
    [("llama", k) for k in _llama_cases()]
    + [("gpt2", k) for k in _gpt2_cases()]
    + [("conv", k) for k in _conv_cases()]
)
CONFIGS = {"llama": _llama_cases, "gpt2": _gpt2_cases, "conv": _conv_cases}


@pytest.mark.parametrize(("kind", "case"), CASES, ids=[f"{k}-{c}" for k, c in CASES])
def test_bf16_logits_equal_peft(kind, case, tmp_path):
    pm = peft.get_peft_model(_bf16_model(kind), CONFIGS[kind]()[case])
    trainable = [p for p in pm.parameters() if p.requires_grad]
    assert {p.dtype for p in trainable} == {torch.float32}  # PEFT's autocast_adapter_dtype
    randomize(trainable, scale=0.3 if kind == "conv" else 0.1)
    want = _outputs(pm.eval(), kind)
    assert want.dtype == BF16
    base = _outputs(_bf16_model(kind), kind)
    assert (want.float() - base.float()).abs().max() > 1e-3  # several bf16 steps: it matters
    pm.save_pretrained(tmp_path)
    am = load_adapter_model(_bf16_model(kind), tmp_path).eval()
    assert {p.dtype for p in am.adapter_parameters("default")} == {torch.float32}
    assert torch.equal(_outputs(am, kind), want)


def test_bf16_splice_adapter_loads_in_peft_with_equal_logits(tmp_path):
    am = AdapterModel(_bf16_model("llama"))
    config = {"r": 4, "target_modules": ["q_proj", "v_proj", "embed_tokens"], "use_dora": True}
    am.add_adapter("default", make_config("lora", config))
    assert {p.dtype for p in am.adapter_parameters("default")} == {torch.float32}
    randomize(am.adapter_parameters("default"))
    want = _outputs(am.eval(), "llama")
    save_adapter(am, tmp_path / "splice")
    pm = peft.PeftModel.from_pretrained(_bf16_model("llama"), tmp_path / "splice").eval()
    assert torch.equal(_outputs(pm, "llama"), want)


def test_bf16_two_active_loras_accumulate_before_rounding(tmp_path):
    """PEFT adds every active adapter's update to the base output in float32 and rounds
    once; splice too (rounding after each adapter would differ)."""
    pm = peft.get_peft_model(_bf16_model("llama"), peft.LoraConfig(r=4, target_modules=["q_proj"]))
    pm.add_adapter("other", peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    randomize([p for n, p in pm.named_parameters() if "lora_" in n])
    pm.base_model.set_adapter(["default", "other"])
    want = _outputs(pm.eval(), "llama")
    pm.save_pretrained(tmp_path)
    am = load_adapter_model(_bf16_model("llama"), tmp_path, name="default")
    load_adapter(am, tmp_path / "other", "other")
    am.set_active(["default", "other"])
    assert torch.equal(_outputs(am.eval(), "llama"), want)
