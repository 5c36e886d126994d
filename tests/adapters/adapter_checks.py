"""Checks shared by the weight-space adapter tests (IA3, VeRA, LoHa, LoKr): fold/unfold
round trip, deltas() against the folded weights, and a few training steps."""

from __future__ import annotations

import torch
from tiny import inputs, logits, randomize

from splice.adapters import AdapterModel


def fold_roundtrip(am: AdapterModel, name: str, base_logits: torch.Tensor) -> None:
    """Fold gives the same outputs, deltas() is exactly what folding adds, unfold restores the
    base bit for bit, disabling gives the base model."""
    out = logits(am)
    assert (out - base_logits).abs().max() > 1e-3  # the adapter matters
    before = {n: p.detach().clone() for n, p in am.model.state_dict().items()}
    deltas = am.deltas(name)
    assert deltas
    am.fold(name)
    torch.testing.assert_close(logits(am), out, atol=1e-5, rtol=0)
    with am.disabled():
        torch.testing.assert_close(logits(am), base_logits)
    after = am.model.state_dict()
    for key, d in deltas.items():
        path, pname = key.rsplit(".", 1)
        full = f"{path}.base_layer.{pname}"
        torch.testing.assert_close(after[full].float() - before[full].float(), d, atol=1e-6, rtol=0)
    am.unfold()
    for n, p in am.model.state_dict().items():
        assert torch.equal(p, before[n]), n  # bit-exact
    torch.testing.assert_close(logits(am), out)


def train_lowers_loss(am: AdapterModel, name: str, steps: int = 5) -> None:
    """A few Adam steps on next-token loss lower it, and only adapter parameters move."""
    randomize(am.adapter_parameters(name), seed=7, scale=0.05)
    frozen = {n: p.detach().clone() for n, p in am.named_parameters() if not p.requires_grad}
    trainable = [p for p in am.parameters() if p.requires_grad]
    assert trainable
    start = [p.detach().clone() for p in trainable]
    opt = torch.optim.Adam(trainable, lr=1e-2)
    batch = inputs(seed=5)
    am.train()
    losses = []
    for _ in range(steps):
        out = am(**batch, labels=batch["input_ids"])
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    am.eval()
    assert losses[-1] < losses[0], losses
    for n, p in am.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    assert any(not torch.equal(p, s) for p, s in zip(trainable, start))


def conv_net(seed: int = 0) -> torch.nn.Module:
    """A tiny conv net (3×3 and 1×1 Conv2d, and a Linear head) for the LyCORIS tests."""
    torch.manual_seed(seed)
    nn = torch.nn
    return nn.Sequential(
        nn.Conv2d(4, 6, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(6, 4, 1),
        nn.Flatten(),
        nn.Linear(4 * 5 * 5, 6),
    ).eval()


def conv_peft_parity(peft_config, splice_config, tmp) -> None:
    """PEFT -> splice and splice -> PEFT on `conv_net`, outputs equal to 1e-5."""
    from peft import PeftModel, get_peft_model

    from splice.adapters import load_adapter_model, save_adapter

    x = torch.randn(2, 4, 5, 5, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base_out = conv_net()(x)
    pm = get_peft_model(conv_net(), peft_config)
    randomize([p for p in pm.parameters() if p.requires_grad], scale=0.3)
    pm.eval()
    with torch.no_grad():
        want = pm(x)
    assert (want - base_out).abs().max() > 1e-3
    pm.save_pretrained(tmp / "peft")
    am = load_adapter_model(conv_net(), tmp / "peft").eval()
    with torch.no_grad():
        torch.testing.assert_close(am(x), want, atol=1e-5, rtol=0)
    am2 = AdapterModel(conv_net())
    am2.add_adapter("default", splice_config)
    randomize(am2.adapter_parameters("default"), seed=5, scale=0.3)
    am2.eval()
    with torch.no_grad():
        want2 = am2(x)
    assert (want2 - base_out).abs().max() > 1e-3
    save_adapter(am2, tmp / "splice")
    pm2 = PeftModel.from_pretrained(conv_net(), tmp / "splice").eval()
    with torch.no_grad():
        torch.testing.assert_close(pm2(x), want2, atol=1e-5, rtol=0)
    am2.fold("default")
    with torch.no_grad():
        torch.testing.assert_close(am2(x), want2, atol=1e-5, rtol=0)
