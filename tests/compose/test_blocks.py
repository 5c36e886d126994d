"""Composition blocks on one nn.Linear: each block against its formula computed by hand from
the adapters' weights, and against the mechanism it equals (several active adapters, the
mixed batch's weighted set)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from splice.adapters import AdapterModel, make_config
from splice.compose import Average, Fuse, Parallel, Stack

H = 4


def bottleneck(am: AdapterModel, name: str, seed: int) -> None:
    am.add_adapter(name, make_config("bottleneck", {"target_modules": ["0"], "bottleneck_size": 2}))
    _randomize(am, name, seed)


def lora(am: AdapterModel, name: str, seed: int, **extra) -> None:
    params = {"target_modules": ["0"], "r": 2, "lora_alpha": 4, **extra}
    am.add_adapter(name, make_config("lora", params))
    _randomize(am, name, seed)


@torch.no_grad()
def _randomize(am: AdapterModel, name: str, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in am.adapter_parameters(name):
        p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def model() -> AdapterModel:
    torch.manual_seed(0)
    return AdapterModel(nn.Sequential(nn.Linear(H, H)).eval())


X = torch.randn(3, H, generator=torch.Generator().manual_seed(7))


def layer(am):
    return am.model[0]


def base_out(am) -> torch.Tensor:
    lin = layer(am).base_layer
    return F.linear(X, lin.weight, lin.bias)


def r(am, name: str, h: torch.Tensor) -> torch.Tensor:
    """A bottleneck adapter's residual by hand: up(relu(down(h)))."""
    a = layer(am).adapters[name]
    down = F.linear(h, a.adapter_down.weight, a.adapter_down.bias)
    return F.linear(torch.relu(down), a.adapter_up.weight, a.adapter_up.bias)


def lora_delta(am, name: str) -> torch.Tensor:
    a = layer(am).adapters[name]
    return a.scaling * a.lora_B.weight @ a.lora_A.weight  # ΔW = s B A


@torch.no_grad()
def run(am, block) -> torch.Tensor:
    am.set_active(block)
    return am(X)


def test_stack_of_bottlenecks_feeds_each_the_previous_output():
    am = model()
    bottleneck(am, "a", 1)
    bottleneck(am, "b", 2)
    h = base_out(am)
    h1 = h + r(am, "a", h)
    expected = h1 + r(am, "b", h1)
    torch.testing.assert_close(run(am, Stack("a", "b")), expected)
    assert am.composition is None and am.active == ["a", "b"]  # it is set_active([a, b])
    torch.testing.assert_close(run(am, ["a", "b"]), expected)
    # order matters
    h1 = h + r(am, "b", h)
    torch.testing.assert_close(run(am, Stack("b", "a")), h1 + r(am, "a", h1))


def test_stack_of_loras_is_the_sum_of_deltas_equal_to_several_active():
    am = model()
    lora(am, "a", 1)
    lora(am, "b", 2)
    expected = base_out(am) + X @ (lora_delta(am, "a") + lora_delta(am, "b")).T
    torch.testing.assert_close(run(am, Stack("a", "b")), expected)
    torch.testing.assert_close(run(am, ["a", "b"]), expected)
    # nested (a layer-level Stack inside an Average of one child): the same forward
    torch.testing.assert_close(run(am, Average(Stack("a", "b"))), expected)


def test_average_of_bottlenecks_weighted_residuals_normalized_weights():
    am = model()
    bottleneck(am, "a", 1)
    bottleneck(am, "b", 2)
    h = base_out(am)
    expected = h + 0.7 * r(am, "a", h) + 0.3 * r(am, "b", h)
    torch.testing.assert_close(run(am, Average("a", "b", weights=[0.7, 0.3])), expected)
    torch.testing.assert_close(run(am, Average("a", "b", weights=[7, 3])), expected)  # / 10
    raw = Average("a", "b", weights=[2, 1], normalize_weights=False)
    torch.testing.assert_close(run(am, raw), h + 2 * r(am, "a", h) + r(am, "b", h))
    torch.testing.assert_close(
        run(am, Average("a", "b")), h + 0.5 * r(am, "a", h) + 0.5 * r(am, "b", h)
    )


def test_average_of_loras_is_the_averaged_delta_and_the_mixed_batch_weighted_set():
    am = model()
    lora(am, "a", 1)
    lora(am, "b", 2)
    block = Average("a", "b", weights=[0.25, 0.75])
    delta = 0.25 * lora_delta(am, "a") + 0.75 * lora_delta(am, "b")
    expected = base_out(am) + X @ delta.T
    got = run(am, block)
    torch.testing.assert_close(got, expected)
    assert am.composition.rows == {"a": 0.25, "b": 0.75}  # runs as the mixed batch
    with torch.no_grad():
        rows = am(X, adapter_names=[{"a": 0.25, "b": 0.75}] * 3)
    torch.testing.assert_close(got, rows, rtol=0, atol=0)
    # the layer-level Average (nested in a Stack) gives the same
    lora(am, "c", 3)
    with torch.no_grad():
        layer(am).adapters["c"].lora_B.weight.zero_()  # c: no change
    torch.testing.assert_close(run(am, Stack("c", block)), expected)


def test_nested_average_after_a_bottleneck_in_a_stack():
    am = model()
    for i, n in enumerate("abc"):
        bottleneck(am, n, i + 1)
    h = base_out(am)
    h1 = h + r(am, "c", h)
    expected = h1 + 0.6 * r(am, "a", h1) + 0.4 * r(am, "b", h1)
    torch.testing.assert_close(run(am, Stack("c", Average("a", "b", weights=[0.6, 0.4]))), expected)


def test_lora_after_a_bottleneck_adds_its_own_delta():
    am = model()
    bottleneck(am, "a", 1)
    lora(am, "l", 2)
    h = base_out(am)
    h1 = h + r(am, "a", h)
    expected = h1 + 0.5 * (X @ lora_delta(am, "l").T) + 0.5 * r(am, "a", h1)
    torch.testing.assert_close(run(am, Stack("a", Average("l", "a"))), expected)


def test_parallel_returns_each_adapter_on_its_own_copy_of_the_input():
    am = model()
    bottleneck(am, "a", 1)
    lora(am, "l", 2)
    outs = run(am, Parallel("a", Stack("a", "l")))
    assert isinstance(outs, list) and len(outs) == 2
    h = base_out(am)
    torch.testing.assert_close(outs[0], h + r(am, "a", h))
    torch.testing.assert_close(outs[1], h + r(am, "a", h) + X @ lora_delta(am, "l").T)


def test_fuse_forward_is_adapterfusion_attention_by_hand():
    am = model()
    bottleneck(am, "a", 1)
    bottleneck(am, "b", 2)
    am.add_fusion(Fuse("a", "b", name="f"))
    fl = am.fusions["f"].layer_at("0")
    # the paper's code init: V = I (1e-6 off the diagonal), Q / K biases 0
    v0 = torch.full((H, H), 1e-6).fill_diagonal_(1.0)
    torch.testing.assert_close(fl.value.weight, v0, rtol=0, atol=0)
    assert fl.query.bias.abs().max() == 0 and fl.key.bias.abs().max() == 0
    assert 0 < fl.query.weight.std() < 0.1
    _randomize_fusion(fl)
    h = base_out(am)
    ra, rb = r(am, "a", h), r(am, "b", h)
    q = F.linear(h, fl.query.weight, fl.query.bias)
    ka = F.linear(ra, fl.key.weight, fl.key.bias)
    kb = F.linear(rb, fl.key.weight, fl.key.bias)
    scores = torch.stack([(q * ka).sum(-1), (q * kb).sum(-1)], -1)
    p = torch.softmax(scores, -1)
    va, vb = ra @ fl.value.weight.T, rb @ fl.value.weight.T
    expected = h + p[:, :1] * va + p[:, 1:] * vb
    torch.testing.assert_close(run(am, Fuse("a", "b", name="f")), expected)
    torch.testing.assert_close(run(am, Fuse(name="f")), expected)  # by name only
    # value after the softmax: V (Σ p r) — the same linear map
    assert not torch.allclose(p[:, 0], p[:, 1])


@torch.no_grad()
def _randomize_fusion(fl) -> None:
    g = torch.Generator().manual_seed(11)
    for p in fl.parameters():
        p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def test_fuse_of_loras_and_a_stack_child():
    am = model()
    lora(am, "a", 1)
    lora(am, "b", 2)
    lora(am, "c", 3)
    am.add_fusion(Fuse("a", Stack("b", "c"), name="f"), {"query": False, "value": False})
    fl = am.fusions["f"].layer_at("0")
    _randomize_fusion(fl)
    h = base_out(am)
    ra = X @ lora_delta(am, "a").T
    rbc = X @ (lora_delta(am, "b") + lora_delta(am, "c")).T  # the whole Stack's update
    ka, kb = F.linear(ra, fl.key.weight, fl.key.bias), F.linear(rbc, fl.key.weight, fl.key.bias)
    p = torch.softmax(torch.stack([(h * ka).sum(-1), (h * kb).sum(-1)], -1), -1)
    expected = h + p[:, :1] * ra + p[:, 1:] * rbc
    torch.testing.assert_close(run(am, Fuse(name="f")), expected)


def test_set_active_list_replaces_a_block_and_disabled_gives_the_base():
    am = model()
    bottleneck(am, "a", 1)
    bottleneck(am, "b", 2)
    am.set_active(Stack("a", Average("a", "b")))
    assert am.composition is not None and layer(am).composition is not None
    with torch.no_grad(), am.disabled():
        torch.testing.assert_close(am(X), base_out(am))
    h = base_out(am)
    torch.testing.assert_close(run(am, "a"), h + r(am, "a", h))
    assert am.composition is None and layer(am).composition is None


@pytest.mark.parametrize("block", [Stack("o", "l"), Stack("l", "o")])
def test_stack_with_an_input_transform_is_the_several_active_forward(block):
    am = model()
    am.add_adapter("o", make_config("oft", {"target_modules": ["0"], "r": 2, "oft_block_size": 0}))
    _randomize(am, "o", 5)
    lora(am, "l", 2)
    expected = run(am, list(block.children))
    torch.testing.assert_close(run(am, Average(block)), expected)  # the layer-level path


def test_parallel_inside_a_stack_runs_the_shared_adapter_on_every_copy():
    am = model()
    for i, n in enumerate("abc"):
        bottleneck(am, n, i + 1)
    outs = run(am, Stack("a", Parallel("b", "c")))
    h = base_out(am)
    h1 = h + r(am, "a", h)
    torch.testing.assert_close(outs[0], h1 + r(am, "b", h1))
    torch.testing.assert_close(outs[1], h1 + r(am, "c", h1))
