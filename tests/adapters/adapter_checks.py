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
