"""`AdapterModel.prepare_adapter` builds an adapter without changing the model (a server
builds in a worker thread while the model runs); `attach_adapter` injects it. Together they
equal `add_adapter`; a failure while building leaves the model untouched."""

from __future__ import annotations

import pytest
import torch
from tiny import inputs, randomize, tiny_llama

from splice.adapters import AdapterConfigError, AdapterModel, make_config
from splice.adapters.model import PreparedAdapter

LORA = make_config("lora", {"r": 4, "target_modules": ["q_proj", "v_proj"]})


def _structure(am: AdapterModel) -> list[str]:
    return [f"{n}:{type(m).__name__}" for n, m in am.named_modules()]


@torch.no_grad()
def test_prepare_changes_nothing_then_attach_equals_add():
    am = AdapterModel(tiny_llama(0))
    before = _structure(am)
    base = am(**inputs()).logits
    prepared = am.prepare_adapter("a", LORA)
    assert _structure(am) == before and am.configs == {} and am.active == []
    assert [p for p, _ in prepared.modules] == [
        f"model.layers.{i}.self_attn.{t}" for i in range(2) for t in ("q_proj", "v_proj")
    ]
    randomize([p for _, m in prepared.modules for p in m.parameters()], seed=5)
    torch.testing.assert_close(am(**inputs()).logits, base, rtol=0, atol=0)
    am.attach_adapter(prepared)
    assert am.active == ["a"] and list(am.configs) == ["a"]
    other = AdapterModel(tiny_llama(0))
    other.add_adapter("a", LORA)
    randomize(other.adapter_parameters("a"), seed=5)
    assert _structure(am) == _structure(other)
    torch.testing.assert_close(am(**inputs()).logits, other(**inputs()).logits, rtol=0, atol=0)
    assert all(p.requires_grad for p in am.adapter_parameters("a"))
    assert not any(p.requires_grad for p in am.model.parameters() if p not in
                   set(am.adapter_parameters("a")))  # fmt: skip
    with pytest.raises(AdapterConfigError, match="already exists"):
        am.attach_adapter(PreparedAdapter("a", LORA))  # a name taken since it was prepared


def test_a_failed_build_leaves_the_model_untouched():
    am = AdapterModel(tiny_llama(0))
    before = _structure(am)
    bad = make_config("lora", {"r": 4, "target_modules": ["q_proj"], "modules_to_save": ["nope"]})
    with pytest.raises(AdapterConfigError, match="modules_to_save"):
        am.add_adapter("a", bad)
    assert _structure(am) == before and am.configs == {}
