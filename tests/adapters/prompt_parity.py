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


def assert_generation_equals_full_forwards(am, new_tokens: int = 4) -> None:
    """Greedy ``am.generate`` (KV cache on) of a left-padded batch equals decoding by full
    forwards without a cache: the same tokens, and each step's scores to 1e-5.

    The reference is not PEFT's ``generate``: with PEFT 0.21 under transformers 5.24 it does
    not equal these full forwards for prompt or prefix tuning (measured: other tokens), and
    splice's did not either until it handled transformers 5's cache name (``cache``)."""
    batch = padded_batch()
    batch.pop("labels")
    kw = dict(
        max_new_tokens=new_tokens,
        do_sample=False,
        output_scores=True,
        return_dict_in_generate=True,
        pad_token_id=0,
    )
    with torch.no_grad():
        got = am.generate(**batch, **kw)
        width = batch["input_ids"].shape[1]
        for t, scores in enumerate(got.scores):
            ids = got.sequences[:, : width + t]
            step_mask = torch.ones(ids.shape[0], t, dtype=batch["attention_mask"].dtype)
            mask = torch.cat([batch["attention_mask"], step_mask], dim=1)
            positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
            logits = am(input_ids=ids, attention_mask=mask, position_ids=positions).logits
            torch.testing.assert_close(scores, logits[:, -1], atol=1e-5, rtol=0)
            assert torch.equal(got.sequences[:, width + t], logits[:, -1].argmax(-1))
    assert len(got.scores) == new_tokens
