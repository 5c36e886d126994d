"""LoRA on nn.Embedding and nn.Conv2d, lora_bias, bias="lora_only"/"all", dropout: values
against the definition, fold/unfold, PEFT parity both ways."""

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from peft_parity import peft_to_splice, splice_to_peft
from tiny import randomize, tiny_llama
from torch import nn

from splice.adapters import (
    AdapterConfigError,
    AdapterModel,
    LoraConfig,
    load_adapter_model,
    save_adapter,
)


def test_embedding_update_values():
    emb = nn.Sequential(nn.Embedding(3, 2))
    with torch.no_grad():
        emb[0].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]]))
    am = AdapterModel(emb)
    am.add_adapter("e", LoraConfig(r=1, lora_alpha=2, target_modules=["0"]))
    lora = am.model[0].adapters["e"]
    # PEFT's init: A = 0, B ~ N(0, 1): no change at init
    assert torch.count_nonzero(lora.lora_embedding_A) == 0
    with torch.no_grad():
        lora.lora_embedding_A.copy_(torch.tensor([[1.0, 0.0, -1.0]]))  # r × num
        lora.lora_embedding_B.copy_(torch.tensor([[1.0], [3.0]]))  # dim × r
    # ΔW = s (B A)ᵀ = 2 · [[1, 0, -1], [3, 0, -3]]ᵀ = [[2, 6], [0, 0], [-2, -6]]
    torch.testing.assert_close(
        am.deltas("e")["0.weight"], torch.tensor([[2.0, 6.0], [0.0, 0.0], [-2.0, -6.0]])
    )
    # token 2: [2, 2] + [-2, -6] = [0, -4]; token 0: [1, 0] + [2, 6] = [3, 6]
    torch.testing.assert_close(am(torch.tensor([2, 0])), torch.tensor([[0.0, -4.0], [3.0, 6.0]]))


def _conv_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 3, 1), nn.Flatten(), nn.Linear(48, 2)
    ).eval()


def _conv_x():
    return torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(5))


def test_conv2d_delta_equals_conv_of_factors():
    am = AdapterModel(_conv_net())
    am.add_adapter("c", LoraConfig(r=2, lora_alpha=4, target_modules=["0", "2"]))
    randomize(am.adapter_parameters("c"))
    lora = am.model[0].adapters["c"]
    a, b = lora.lora_A.weight, lora.lora_B.weight[:, :, 0, 0]
    # ΔW[o,i,k,l] = s Σ_r B[o,r] A[r,i,k,l], s = 4/2; check one entry by hand
    d = am.deltas("c")["0.weight"]
    assert d.shape == (4, 2, 3, 3)
    hand = 2 * (b[1, 0] * a[0, 1, 2, 0] + b[1, 1] * a[1, 1, 2, 0])
    torch.testing.assert_close(d[1, 1, 2, 0], hand)
    # the forward equals a conv with W + ΔW (conv is linear in the kernel)
    x = _conv_x()
    base = am.model[0].base_layer
    want = F.conv2d(x, base.weight + d, base.bias, padding=1)
    torch.testing.assert_close(am.model[0](x), want, atol=1e-5, rtol=0)
    out = am(x)
    am.fold("c")
    torch.testing.assert_close(am(x), out, atol=1e-5, rtol=0)
    am.unfold()
    assert torch.equal(am.model[0].base_layer.weight, _conv_net()[0].weight)


@pytest.mark.parametrize("dora", [False, True])
def test_conv2d_peft_parity_both_ways(tmp_path, dora):
    x = _conv_x()
    pm = get_peft_model(
        _conv_net(), PeftLoraConfig(r=2, lora_alpha=4, target_modules=["0", "2"], use_dora=dora)
    )
    randomize([p for p in pm.parameters() if p.requires_grad])
    pm.eval()
    want = pm(x)
    pm.save_pretrained(tmp_path / "peft")
    am = load_adapter_model(_conv_net(), tmp_path / "peft").eval()
    torch.testing.assert_close(am(x), want, atol=1e-5, rtol=0)
    # and back: splice saves, PEFT loads
    am2 = AdapterModel(_conv_net())
    am2.add_adapter(
        "default", LoraConfig(r=2, lora_alpha=4, target_modules=["0", "2"], use_dora=dora)
    )
    randomize(am2.adapter_parameters("default"), seed=7)
    want2 = am2.eval()(x)
    save_adapter(am2, tmp_path / "splice")
    pm2 = PeftModel.from_pretrained(_conv_net(), tmp_path / "splice").eval()
    torch.testing.assert_close(pm2(x), want2, atol=1e-5, rtol=0)
    assert (want2 - _conv_net()(x)).abs().max() > 1e-3
    # merged weights agree with PEFT's merge
    merged = pm2.merge_and_unload().state_dict()
    base = _conv_net().state_dict()
    for name, d in am2.deltas("default").items():
        torch.testing.assert_close(base[name] + d, merged[name], atol=1e-5, rtol=0)


def test_conv2d_unsupported_kinds():
    net = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))
    am = AdapterModel(net)
    with pytest.raises(AdapterConfigError, match="groups=1"):
        am.add_adapter("c", LoraConfig(r=2, target_modules=["0"]))


def test_lora_bias_values():
    base = nn.Sequential(nn.Linear(2, 2))
    with torch.no_grad():
        base[0].weight.zero_()
        base[0].bias.copy_(torch.tensor([1.0, 2.0]))
    am = AdapterModel(base)
    am.add_adapter("a", LoraConfig(r=1, lora_alpha=3, lora_bias=True, target_modules=["0"]))
    lora = am.model[0].adapters["a"]
    assert torch.count_nonzero(lora.lora_B.bias) == 0  # PEFT: zero at init
    with torch.no_grad():
        lora.lora_B.bias.copy_(torch.tensor([1.0, -1.0]))
    # B = 0 so only the bias acts: y = b + s β = [1, 2] + 3 · [1, -1] = [4, -1]
    torch.testing.assert_close(am(torch.zeros(1, 2)), torch.tensor([[4.0, -1.0]]))
    torch.testing.assert_close(am.deltas("a")["0.bias"], torch.tensor([3.0, -3.0]))


def test_bias_lora_only_trains_a_copy_and_saves_base_layer_bias(tmp_path):
    with pytest.raises(AdapterConfigError, match="bias"):
        LoraConfig.from_dict({"bias": "some"})
    with pytest.raises(AdapterConfigError, match=r"bias='all'.*not supported yet"):
        LoraConfig.from_dict({"bias": "all"})
    model = tiny_llama()
    for layer in model.model.layers:  # llama without biases: give q_proj one
        q = layer.self_attn.q_proj
        q.bias = nn.Parameter(torch.zeros(q.out_features))
    am = AdapterModel(model)
    am.add_adapter("a", LoraConfig(r=2, bias="lora_only", target_modules=["q_proj", "v_proj"]))
    trainable = sorted(n for n, p in am.named_parameters() if p.requires_grad)
    assert sum(n.endswith("base_bias") for n in trainable) == 2  # q_proj only: v has no bias
    mods = dict(am.named_adapter_modules("a"))
    with torch.no_grad():
        mods["model.layers.0.self_attn.q_proj"].base_bias.fill_(0.5)
    d = am.deltas("a")
    torch.testing.assert_close(d["model.layers.0.self_attn.q_proj.bias"], torch.full((32,), 0.5))
    assert "model.layers.0.self_attn.v_proj.bias" not in d
    save_adapter(am, tmp_path / "a", "a")
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.0.self_attn.q_proj.base_layer.bias"
    torch.testing.assert_close(saved[key], torch.full((32,), 0.5))
    with am.disabled():  # the base bias itself is untouched
        assert torch.count_nonzero(am.model.model.layers[0].self_attn.q_proj.base_layer.bias) == 0


def test_dropout_only_in_training():
    base = nn.Sequential(nn.Linear(4, 4, bias=False))
    am = AdapterModel(base)
    am.add_adapter("a", LoraConfig(r=2, lora_dropout=0.5, target_modules=["0"]))
    randomize(am.adapter_parameters("a"))
    x = torch.ones(3, 4)
    am.eval()
    y1, y2 = am(x), am(x)
    assert torch.equal(y1, y2)
    torch.testing.assert_close(y1, x @ (base[0].base_layer.weight + am.deltas("a")["0.weight"]).T)
    am.train()
    torch.manual_seed(0)
    assert not torch.allclose(am(x), y1)


PEFT_CASES = {
    "llama-embed": ("llama", dict(r=4, lora_alpha=8, target_modules=["embed_tokens"])),
    "llama-embed-q-rslora": (
        "llama",
        dict(r=4, lora_alpha=8, use_rslora=True, target_modules=["embed_tokens", "q_proj"]),
    ),
    "llama-gaussian-dropout": (
        "llama",
        dict(r=4, init_lora_weights="gaussian", lora_dropout=0.1, target_modules=["v_proj"]),
    ),
    "bert-bias-lora-only": (
        "bert",
        dict(
            r=2,
            bias="lora_only",
            target_modules=["query", "value"],
            modules_to_save=["classifier"],
        ),
    ),
    "bert-lora-bias": (
        "bert",
        dict(r=2, lora_bias=True, target_modules=["key", "dense"], modules_to_save=["classifier"]),
    ),
}


@pytest.mark.parametrize("case", sorted(PEFT_CASES))
def test_peft_to_splice(case, tmp_path):
    kind, kw = PEFT_CASES[case]
    task = {"bert": "SEQ_CLS"}.get(kind, "CAUSAL_LM")
    peft_to_splice(kind, PeftLoraConfig(task_type=task, **kw), tmp_path)


@pytest.mark.parametrize("case", sorted(PEFT_CASES))
def test_splice_to_peft(case, tmp_path):
    kind, kw = PEFT_CASES[case]
    splice_to_peft(kind, LoraConfig(**kw), tmp_path)


def test_training_lowers_loss_and_touches_only_the_adapter():
    am = AdapterModel(tiny_llama())
    am.add_adapter(
        "a", LoraConfig(r=4, use_dora=True, target_modules=["embed_tokens", "q_proj", "v_proj"])
    )
    before = {n: p.clone() for n, p in am.named_parameters()}
    opt = torch.optim.AdamW([p for p in am.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    am.train()
    losses = []
    for _ in range(5):
        loss = am(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for n, p in am.named_parameters():
        if not torch.equal(p, before[n]):
            assert ".adapters.a." in n, n
