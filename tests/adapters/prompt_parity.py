"""PEFT parity for the model-level (prompt learning) adapters: logits, loss and greedy
generation equal to 1e-5 both ways, on a batch with left padding and labels."""

from __future__ import annotations

from pathlib import Path

import torch
from tiny import FACTORIES, inputs, randomize

from splice.adapters import AdapterModel, load_adapter_model, save_adapter


def padded_batch() -> dict[str, torch.Tensor]:
    """Two rows of 7 tokens; the second is left-padded by 2 (mask 0, label -100 there)."""
    b = inputs()
    b["attention_mask"][1, :2] = 0
    labels = b["input_ids"].clone()
    labels[b["attention_mask"] == 0] = -100
    b["labels"] = labels
    return b


@torch.no_grad()
def run(model, batch):
    out = model(**batch)
    return out.logits, out.loss


@torch.no_grad()
def base_logits(kind: str, seed: int = 0) -> torch.Tensor:
    return FACTORIES[kind](seed)(**padded_batch()).logits


def assert_same_outputs(am, pm, kind: str, seed: int = 0) -> None:
    batch = padded_batch()
    got_logits, got_loss = run(am, batch)
    want_logits, want_loss = run(pm, batch)
    assert got_logits.shape == want_logits.shape
    torch.testing.assert_close(got_logits, want_logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(got_loss, want_loss, atol=1e-5, rtol=0)
    # the adapter must matter, or the comparison proves nothing
    t = batch["input_ids"].shape[1]
    assert (got_logits[:, -t:] - base_logits(kind, seed)).abs().max() > 1e-3


def peft_to_splice(kind: str, peft_config, tmp: Path, seed: int = 0):
    from peft import get_peft_model

    pm = get_peft_model(FACTORIES[kind](seed), peft_config)
    randomize([p for p in pm.parameters() if p.requires_grad])
    pm.eval()
    pm.save_pretrained(tmp / "peft")
    am = load_adapter_model(FACTORIES[kind](seed), tmp / "peft").eval()
    assert_same_outputs(am, pm, kind, seed)
    return am, pm


def splice_to_peft(kind: str, config, tmp: Path, seed: int = 0):
    from peft import PeftModel

    am = AdapterModel(FACTORIES[kind](seed))
    am.add_adapter("default", config)
    randomize(am.adapter_parameters("default"))
    am.eval()
    save_adapter(am, tmp / "splice")
    pm = PeftModel.from_pretrained(FACTORIES[kind](seed), tmp / "splice").eval()
    assert_same_outputs(am, pm, kind, seed)
    return am, pm


def assert_same_generation(am, pm, new_tokens: int = 4) -> None:
    batch = padded_batch()
    batch.pop("labels")
    kw = dict(
        max_new_tokens=new_tokens,
        do_sample=False,
        output_scores=True,
        return_dict_in_generate=True,
        pad_token_id=0,
    )
    got = am.generate(**batch, **kw)
    want = pm.generate(**batch, **kw)
    assert torch.equal(got.sequences, want.sequences)
    assert len(got.scores) == new_tokens
    for g, w in zip(got.scores, want.scores, strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=0)
