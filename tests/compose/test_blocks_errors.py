"""Bad compositions: one clear CompositionError line, before any compute, model unchanged."""

from __future__ import annotations

import pytest
import torch
from test_blocks import X, bottleneck, lora, model

from splice.adapters import make_config
from splice.compose import Average, CompositionError, Fuse, Parallel, Stack
from splice.errors import SpliceError


def two() -> object:
    am = model()
    bottleneck(am, "alpha", 1)
    bottleneck(am, "beta", 2)
    return am


def test_composition_error_is_a_splice_error():
    assert issubclass(CompositionError, SpliceError)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: Stack(), "at least one adapter"),
        (lambda: Stack("a", "a"), "'a' named twice"),
        (lambda: Stack("a", Stack("b")), "Stack cannot hold a Stack"),
        (lambda: Fuse("a", Average("b", "c")), "Fuse cannot hold an Average"),
        (lambda: Average("a", Parallel("b", "c")), "Average cannot hold a Parallel"),
        (lambda: Parallel("a", Fuse("b", "c")), "Parallel cannot hold a Fuse"),
        (lambda: Fuse("a", Stack("b", Average("c"))), "a Stack inside Fuse holds adapter names"),
        (lambda: Stack(Parallel("a", "b"), Parallel("c", "d")), "at most one Parallel"),
        (lambda: Stack("a", 3), "adapter name or a block, got int"),
        (lambda: Average("a", "b", weights=[1.0]), "1 weights for 2 adapters"),
        (lambda: Average("a", "b", weights=[1.0, float("nan")]), "not a finite number"),
        (lambda: Average("a", "b", weights=[1.0, -1.0]), "sum to 0"),
    ],
)
def test_malformed_blocks_are_refused_at_construction(make, message):
    with pytest.raises(CompositionError, match=message):
        make()


def test_unknown_adapter_names_the_closest():
    am = two()
    with pytest.raises(CompositionError, match=r"no adapter named 'alfa' \(did you mean 'alpha'"):
        am.set_active(Stack("beta", Average("alfa", "beta")))
    assert am.active == ["alpha"] and am.composition is None  # unchanged


def test_model_level_adapter_in_a_block():
    from splice.adapters import AdapterModel
    from tiny_hf import tiny_llama

    am = AdapterModel(tiny_llama().eval())
    am.add_adapter("p", make_config("prompt_tuning", {"num_virtual_tokens": 2}))
    am.add_adapter("l", make_config("lora", {"r": 2, "target_modules": ["q_proj"]}))
    with pytest.raises(CompositionError, match=r"'p' .*model-level adapter"):
        am.set_active(Stack("l", "p"))


def test_folded_adapter_in_a_block():
    am = model()
    lora(am, "a", 1)
    lora(am, "b", 2)
    am.fold("a")
    with pytest.raises(CompositionError, match=r"'a' is folded into '0'; unfold it"):
        am.set_active(Average("a", "b"))


def test_fuse_over_adapters_on_different_layers():
    from torch import nn

    from splice.adapters import AdapterModel

    am = AdapterModel(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)))
    am.add_adapter("a", make_config("bottleneck", {"target_modules": ["0", "1"]}))
    am.add_adapter("b", make_config("bottleneck", {"target_modules": ["0"]}))
    with pytest.raises(CompositionError, match=r"a and b adapt different layers .*'1' only in a"):
        am.add_fusion(Fuse("a", "b"))
    assert len(am.fusions) == 0


def test_fuse_needs_its_fusion_added_and_matching():
    am = two()
    with pytest.raises(CompositionError, match=r"no fusion named 'f'.*add_fusion"):
        am.set_active(Fuse("alpha", "beta", name="f"))
    am.add_fusion(Fuse("alpha", "beta", name="f"))
    with pytest.raises(CompositionError, match=r"already exists"):
        am.add_fusion(Fuse("alpha", "beta", name="f"))
    with pytest.raises(CompositionError, match=r"was added over \['alpha', 'beta'\]"):
        am.set_active(Fuse("beta", "alpha", name="f"))
    with pytest.raises(CompositionError, match=r"only Fuse is added"):
        am.add_fusion(Stack("alpha"))
    with pytest.raises(CompositionError, match=r"fusion name 'a.b'"):
        am.add_fusion(Fuse("alpha", "beta", name="a.b"))
    with pytest.raises(CompositionError, match=r"'qurey': unknown key \(did you mean 'query'"):
        am.add_fusion(Fuse("alpha", "beta", name="g"), {"qurey": False})


def test_parallel_batch_and_generate_errors():
    am = two()
    am.set_active(Parallel("alpha", "beta"))
    with pytest.raises(CompositionError, match=r"generate.*Parallel"):
        am.generate(torch.zeros(1, 3, dtype=torch.long))
    outs = am(X)
    assert len(outs) == 2
