"""splice.delta: each type's ΔW on small hand-computed inputs, the algebra, serialization."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from splice.delta import (
    DeltaError,
    Dense,
    Folded,
    LowRank,
    Sparse,
    Ternary,
    apply_delta,
    delta_from_tensors,
    delta_types,
    sparsify,
    ternarize,
    to_tensors,
)

T = torch.tensor


def test_dense_scalingadd():
    d = Dense(T([[1.0, -2.0], [0.5, 4.0]]))
    assert torch.equal(d.scale(2).to_dense(), T([[2.0, -4.0], [1.0, 8.0]]))
    s = d.add(Dense(T([[1.0, 1.0], [1.0, 1.0]])))
    assert isinstance(s, Dense)
    assert torch.equal(s.to_dense(), T([[2.0, -1.0], [1.5, 5.0]]))
    assert d.nbytes == 16


def test_low_rank_values_and_orientation():
    lr = LowRank(T([[1.0], [2.0]]), T([[3.0, 4.0, 5.0]]), 0.5)
    want = T([[1.5, 2.0, 2.5], [3.0, 4.0, 5.0]])
    assert lr.shape == (2, 3) and lr.rank == 1
    assert torch.equal(lr.to_dense(), want)
    t = LowRank(lr.b, lr.a, 0.5, transposed=True)
    assert t.shape == (3, 2) and torch.equal(t.to_dense(), want.T)
    assert lr.nbytes == (2 + 3) * 4


def test_low_rank_conv_shape():
    b = T([[1.0], [-1.0]])  # out 2, r 1
    a = T([[1.0, 2.0, 3.0, 4.0]])  # in 1 × 2 × 2 kernel
    lr = LowRank(b, a, 1.0, weight_shape=(2, 1, 2, 2))
    assert torch.equal(lr.to_dense()[1, 0], T([[-1.0, -2.0], [-3.0, -4.0]]))
    with pytest.raises(DeltaError, match="weight_shape"):
        LowRank(b, a, 1.0, weight_shape=(3, 3))


def test_low_rank_truncate_is_eckart_young():
    # B A = diag(3, 1): the best rank-1 approximation is diag(3, 0)
    lr = LowRank(torch.eye(2), T([[3.0, 0.0], [0.0, 1.0]]), 2.0)
    one = lr.truncate(1)
    assert one.rank == 1
    assert torch.allclose(one.to_dense(), T([[6.0, 0.0], [0.0, 0.0]]), atol=1e-6)
    assert torch.allclose(lr.truncate(5).to_dense(), lr.to_dense(), atol=1e-6)
    with pytest.raises(DeltaError, match="at least 1"):
        lr.truncate(0)


def test_low_rank_add_concatenates():
    g = torch.Generator().manual_seed(0)
    x = LowRank(torch.randn(4, 2, generator=g), torch.randn(2, 3, generator=g), 0.5)
    y = LowRank(torch.randn(4, 1, generator=g), torch.randn(1, 3, generator=g), 0.5)
    z = LowRank(torch.randn(4, 1, generator=g), torch.randn(1, 3, generator=g), 3.0)
    xy = x.add(y)
    assert isinstance(xy, LowRank) and xy.rank == 3 and xy.scaling == 0.5
    assert torch.allclose(xy.to_dense(), x.to_dense() + y.to_dense(), atol=1e-6)
    xz = x.add(z)
    assert isinstance(xz, LowRank) and xz.rank == 3
    assert torch.allclose(xz.to_dense(), x.to_dense() + z.to_dense(), atol=1e-6)
    # different orientation: exact dense sum
    xt = LowRank(x.b[:3], x.a[:, :3], 1.0, transposed=True)
    sq = LowRank(x.b[:3], x.a[:, :3], 1.0)
    mixed = sq.add(xt)
    assert isinstance(mixed, Dense)
    assert torch.allclose(mixed.to_dense(), sq.to_dense() + sq.to_dense().T)


def test_sparse_values_add_and_sparsify():
    s = Sparse.from_mask(T([1.0, -3.0, 2.0, 0.5]), T([False, True, True, False]))
    assert s.indices.tolist() == [1, 2] and s.values.tolist() == [-3.0, 2.0]
    assert s.density == 0.5
    assert torch.equal(s.to_dense(), T([0.0, -3.0, 2.0, 0.0]))
    other = Sparse(T([2, 3]), T([1.0, 7.0]), (4,))
    both = s.add(other)
    assert isinstance(both, Sparse)
    assert both.indices.tolist() == [1, 2, 3] and both.values.tolist() == [-3.0, 3.0, 7.0]
    kept = sparsify(Dense(T([[1.0, -3.0], [2.0, 0.5]])), 0.5)
    assert kept.indices.tolist() == [1, 2]
    assert torch.equal(kept.to_dense(), T([[0.0, -3.0], [2.0, 0.0]]))
    with pytest.raises(DeltaError, match="increase strictly"):
        Sparse(T([2, 1]), T([1.0, 1.0]), (4,))
    with pytest.raises(DeltaError, match="increase strictly"):
        Sparse(T([0, 4]), T([1.0, 1.0]), (4,))


def test_ternary_bitdelta_and_compeft_scales():
    d = Dense(T([1.0, -3.0, 2.0, 0.5]))
    bit = ternarize(d)  # every sign, gamma = mean |ΔW| = 6.5 / 4
    assert bit.signs.tolist() == [1, -1, 1, 1]
    assert torch.allclose(bit.to_dense(), T([1.625, -1.625, 1.625, 1.625]))
    com = ternarize(d, density=0.5, scale="std", alpha=2.0)
    std = math.sqrt(((0.875**2) + 3.125**2 + 1.875**2 + 0.375**2) / 3)
    assert com.signs.tolist() == [0, -1, 1, 0]
    assert com.gamma == pytest.approx(2 * std, rel=1e-6)
    assert com.nbytes == 4 + 4
    with pytest.raises(DeltaError, match="-1, 0 or \\+1"):
        Ternary(T([2], dtype=torch.int8), 1.0)
    # two ternaries sum exactly as a dense tensor
    assert torch.allclose(bit.add(com).to_dense(), bit.to_dense() + com.to_dense())


def test_folded_transforms_by_hand():
    w = T([[1.0, 2.0], [3.0, 4.0]])
    ia3 = Folded("scale", {"vector": T([[2.0], [0.5]])}, (2, 2))
    assert torch.equal(ia3.to_dense(w), T([[1.0, 2.0], [-1.5, -2.0]]))
    swap = Folded("matmul_right", {"matrix": T([[0.0, 1.0], [1.0, 0.0]])}, (2, 2))
    assert torch.equal(swap.to_dense(w), T([[1.0, -1.0], [1.0, -1.0]]))
    left = Folded("matmul_left", {"matrix": T([[0.0, 1.0], [1.0, 0.0]])}, (2, 2))
    assert torch.equal(left.to_dense(w), T([[2.0, 2.0], [-2.0, -2.0]]))
    assert torch.equal(ia3.scale(0.5).to_dense(w), T([[0.5, 1.0], [-0.75, -1.0]]))
    with pytest.raises(DeltaError, match="needs the base"):
        ia3.to_dense()
    with pytest.raises(DeltaError, match="unknown folded transform"):
        Folded("rotate", {}, (2, 2))
    both = ia3.add(Dense(torch.ones(2, 2)), base=w)
    assert torch.equal(both.to_dense(), T([[2.0, 3.0], [-0.5, -1.0]]))
    assert torch.equal(apply_delta(w, ia3), T([[2.0, 4.0], [1.5, 2.0]]))


def test_folded_dora_by_hand_and_against_the_adapter():
    # B = 0: W' = m / ‖W‖_row ⊙ W; rows of norm 3 and 4, m = (6, 2) -> c = (2, 0.5)
    w = T([[3.0, 0.0], [0.0, 4.0]])
    dora = Folded(
        "dora", {"b": torch.zeros(2, 1), "a": T([[1.0, 1.0]]), "magnitude": T([6.0, 2.0])}, (2, 2)
    )
    assert torch.equal(dora.to_dense(w), T([[3.0, 0.0], [0.0, -2.0]]))

    from torch import nn

    from splice.adapters import AdapterModel, LoraConfig

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 4))
    model = AdapterModel(net)
    model.add_adapter("d", LoraConfig(r=2, lora_alpha=4, target_modules=["0"], use_dora=True))
    layer = model.model[0]
    module = layer.adapters["d"]
    with torch.no_grad():
        module.lora_B.weight.normal_()
    folded = Folded(
        "dora",
        {
            "b": module.lora_B.weight.detach(),
            "a": module.lora_A.weight.detach(),
            "magnitude": module.lora_magnitude_vector.detach(),
        },
        (4, 5),
        {"lora_scale": module.scaling},
    )
    # the adapter's own forward (PEFT's DoRA forward, computed without ΔW) is the reference
    base_w = layer.base_layer.weight.detach()
    x = torch.randn(3, 5)
    with torch.no_grad():
        want = model.model(x)
        got = torch.nn.functional.linear(x, base_w + folded.to_dense(base_w), layer.base_layer.bias)
    assert torch.allclose(got, want, atol=1e-5)


@pytest.mark.parametrize(
    "delta",
    [
        Dense(T([[1.0, -2.0]])),
        LowRank(T([[1.0], [2.0]]), T([[3.0, 4.0]]), 0.25, transposed=True),
        LowRank(T([[1.0], [2.0]]), T([[3.0, 4.0]]), 1.0, weight_shape=(2, 2, 1, 1)),
        Sparse(T([0, 3]), T([1.5, -2.0]), (2, 2)),
        Ternary(T([[1, 0], [-1, 1]], dtype=torch.int8), 0.75),
        Folded("scale", {"vector": T([[2.0, 0.5]])}, (2, 2), factor=3.0),
        Folded(
            "dora",
            {"b": T([[1.0], [0.0]]), "a": T([[0.5, 0.5]]), "magnitude": T([1.0, 2.0])},
            (2, 2),
            {"lora_scale": 2.0},
        ),
    ],
    ids=lambda d: type(d).__name__,
)
def test_serialization_round_trip(delta, tmp_path: Path):
    tensors, meta = to_tensors("layer.q.weight", delta)
    save_file(tensors, tmp_path / "d.safetensors", metadata={"layer.q.weight": meta})
    back = delta_from_tensors("layer.q.weight", load_file(tmp_path / "d.safetensors"), meta)
    assert type(back) is type(delta) and back.shape == delta.shape
    base = torch.arange(1.0, 1.0 + math.prod(delta.shape)).reshape(delta.shape)
    assert torch.equal(back.to_dense(base), delta.to_dense(base))


def test_bad_inputs_are_clear():
    assert delta_types() == ["dense", "folded", "low_rank", "sparse", "ternary"]
    with pytest.raises(DeltaError, match="finite"):
        Dense(T([1.0])).scale(float("nan"))
    with pytest.raises(DeltaError, match="finite"):
        LowRank(T([[1.0]]), T([[1.0]]), float("inf"))
    with pytest.raises(DeltaError, match="shapes"):
        Dense(T([1.0, 2.0])).add(Dense(T([1.0])))
    with pytest.raises(DeltaError, match="B out×r"):
        LowRank(T([[1.0, 2.0]]), T([[1.0, 2.0]]))
    with pytest.raises(DeltaError, match="unknown type"):
        delta_from_tensors("x", {}, '{"type": "nope"}')
    with pytest.raises(DeltaError, match="unreadable"):
        delta_from_tensors("x", {}, "not json")
