"""Both-ways PEFT parity: an adapter saved by PEFT loads in splice with the same logits, and
one saved by splice loads in PEFT with the same logits (to 1e-5)."""

from __future__ import annotations

from pathlib import Path

import torch
from tiny import FACTORIES, logits, randomize

from splice.adapters import AdapterModel, load_adapter_model, save_adapter


def peft_to_splice(kind: str, peft_config, tmp: Path, seed: int = 0, atol: float = 1e-5):
    from peft import get_peft_model

    pm = get_peft_model(FACTORIES[kind](seed), peft_config)
    randomize([p for n, p in pm.named_parameters() if p.requires_grad])
    pm.eval()
    expected = logits(pm)
    pm.save_pretrained(tmp / "peft")
    am = load_adapter_model(FACTORIES[kind](seed), tmp / "peft").eval()
    got = logits(am)
    torch.testing.assert_close(got, expected, atol=atol, rtol=0)
    return am, pm


def splice_to_peft(kind: str, config, tmp: Path, seed: int = 0, atol: float = 1e-5):
    from peft import PeftModel

    am = AdapterModel(FACTORIES[kind](seed))
    am.add_adapter("default", config)
    randomize(am.adapter_parameters("default"))
    am.eval()
    expected = logits(am)
    save_adapter(am, tmp / "splice")
    pm = PeftModel.from_pretrained(FACTORIES[kind](seed), tmp / "splice").eval()
    got = logits(pm)
    torch.testing.assert_close(got, expected, atol=atol, rtol=0)
    # the adapter must matter, or the comparison proves nothing
    assert (expected - logits(FACTORIES[kind](seed))).abs().max() > 1e-3
    return am, pm
