"""Checks for the OFT / HRA / BitFit / LN-tuning / bottleneck tests: a few optimizer steps
lower the loss and change only the adapter's own parameters; folding matches the forward,
moves the base by exactly deltas(), and unfolds bit for bit."""

from __future__ import annotations

import torch
from tiny import inputs


def lm_loss(am) -> torch.Tensor:
    batch = inputs()
    return am(**batch, labels=batch["input_ids"]).loss


def cls_loss(am) -> torch.Tensor:
    return am(**inputs(), labels=torch.tensor([0, 2])).loss


def check_training(am, name: str, loss_fn=lm_loss, steps: int = 5, lr: float = 1e-2) -> None:
    params = am.adapter_parameters(name)
    assert params and all(p.requires_grad for p in params)
    own = {id(p) for p in params}
    before = {n: p.detach().clone() for n, p in am.named_parameters()}
    opt = torch.optim.Adam(params, lr=lr)
    am.eval()  # losses compared in eval mode (no dropout); steps taken in training mode
    with torch.no_grad():
        first = loss_fn(am).item()
    am.train()
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(am).backward()
        opt.step()
    am.eval()
    with torch.no_grad():
        last = loss_fn(am).item()
    assert last < first, (first, last)
    changed = {n for n, p in am.named_parameters() if not torch.equal(p, before[n])}
    named = dict(am.named_parameters())
    assert changed, "nothing trained"
    assert all(id(named[n]) in own for n in changed), sorted(changed)[:4]
    for n, p in am.named_parameters():  # every base parameter bit-identical
        if id(p) not in own:
            assert torch.equal(p, before[n]), n


def check_fold(am, name: str, base_logits: torch.Tensor) -> None:
    """fold: same outputs (1e-5) and the base parameters move by exactly deltas(); disabled:
    the base model; unfold: the original tensors bit for bit."""
    from tiny import logits

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
        assert torch.equal(p, before[n]), n
    torch.testing.assert_close(logits(am), out)
