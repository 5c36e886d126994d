"""The compiled float32 TIES combine against the torch ops it replaces: the same bits."""

import numpy as np
import pytest
import torch

from splice.merge.methods import _common
from splice.merge.methods._common import linear_combine_, ties_combine_

pytestmark = pytest.mark.skipif(
    _common._ties_kernel is None, reason="C extension not built (no compiler)"
)


def _inputs(seed: int, n_models: int, shape=(64, 96)):
    """A base and sparse task vectors with bf16-rounded entries: exact zeros, equal
    magnitudes of opposite sign (votes that cancel to exactly 0), ordinary values."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    deltas = []
    for _ in range(n_models):
        d = (torch.randn(shape, generator=g) * 0.01).bfloat16().float()
        d[torch.rand(shape, generator=g) < 0.5] = 0
        deltas.append(d)
    deltas[-1][:8] = -deltas[0][:8]  # S = 0 exactly where the others are zero
    return base, deltas


def _both(base, deltas, monkeypatch, combine=ties_combine_, **kw):
    """``combine`` with the compiled kernel and with torch's ops."""
    fused = combine(base.clone(), [d.clone() for d in deltas], **kw)
    with monkeypatch.context() as m:
        m.setattr(_common, "_ties_kernel", None)
        plain = combine(base.clone(), [d.clone() for d in deltas], **kw)
    return fused, plain


@pytest.mark.parametrize("majority", ["sum", "count"])
@pytest.mark.parametrize("disjoint", ["mean", "sum"])
@pytest.mark.parametrize("n_models", [1, 2, 3, 5])
def test_fused_gives_the_same_bits(monkeypatch, majority, disjoint, n_models):
    base, deltas = _inputs(n_models, n_models)
    weight = [1.0, 0.8, -0.6, 0.3, 2.5][:n_models]
    for lam in (1.0, 0.7):
        fused, plain = _both(
            base,
            deltas,
            monkeypatch,
            weight=weight,
            majority=majority,
            disjoint=disjoint,
            lambda_=lam,
        )
        assert torch.equal(fused.view(torch.int32), plain.view(torch.int32))


def test_fused_hand_computed():
    """Entry 0: v = (0.5, -0.25, 0.125), S > 0, agreeing 0.5 and 0.125 with weights 1 and
    0.5 -> (0.5 + 0.125) / 1.5. Entry 1: v = (-1, 0, 0.5), S < 0 -> -1 / 1. Entry 2: all
    zero -> 0 / 1 (divisor 0 counts as 1)."""
    base = torch.tensor([1.0, 2.0, 3.0])
    deltas = [
        torch.tensor([0.5, -1.0, 0.0]),
        torch.tensor([-0.5, 0.0, 0.0]),
        torch.tensor([0.25, 1.0, 0.0]),
    ]
    out = ties_combine_(base, deltas, weight=[1.0, 0.5, 0.5])
    assert torch.equal(out, torch.tensor([1.0 + 0.625 / 1.5, 1.0, 3.0]))


def test_other_dtypes_and_max_use_torch_ops():
    base, deltas = _inputs(0, 2)
    assert not _common.fused_ties_applies(base.bfloat16(), [d.bfloat16() for d in deltas], "mean")
    assert not _common.fused_ties_applies(base, deltas, "max")
    assert _common.fused_ties_applies(base, deltas, "mean")


@pytest.mark.parametrize("consensus", [None, "sum", "count"])
@pytest.mark.parametrize("normalize", [True, False])
def test_fused_bf16_gta_gives_the_same_bits(monkeypatch, consensus, normalize):
    """mergekit's bf16 arithmetic, compiled, against the torch ops (stack, sum(dim=0), ...)."""
    from splice.merge.methods import _mergekit_precision as mp

    base, deltas = _inputs(11, 3, shape=(64, 100))  # 6400 entries: blocks + a remainder
    base, deltas = base.bfloat16(), [d.bfloat16() for d in deltas]
    deltas[1][5, :4] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0])
    deltas[2][6, 7] = float("inf")
    for lam in (1.0, 0.7):
        kw = dict(consensus=consensus, normalize=normalize, lambda_=lam)
        fused = mp.gta_combine(base.clone(), [d.clone() for d in deltas], [1.0, 0.8, -0.6], **kw)
        with monkeypatch.context() as m:
            m.setattr(mp, "_ties_kernel", None)
            plain = mp.gta_combine(
                base.clone(), [d.clone() for d in deltas], [1.0, 0.8, -0.6], **kw
            )
        # the same bits, but for the NaN payload (the kernel writes torch's canonical NaN)
        nan = plain.isnan()
        assert torch.equal(fused.isnan(), nan) and nan.any()
        assert torch.equal(fused.view(torch.int16)[~nan], plain.view(torch.int16)[~nan])


@pytest.mark.parametrize("n_models", [1, 2, 3, 5])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("shape", [(), (7,), (515, 3)])
def test_fused_linear_gives_the_same_bits(monkeypatch, n_models, normalize, shape):
    """Task arithmetic's float32 combine, compiled, against torch's mul_ / add_ / div_: the
    same bits, with weights and λ that float32 cannot hold exactly, −0, ±inf, NaN, overflow
    and subnormals among the entries."""
    g = torch.Generator().manual_seed(n_models)
    base = torch.randn(shape, generator=g) * 3
    deltas = [torch.randn(shape, generator=g) * 10.0 ** (i - 2) for i in range(n_models)]
    if shape == (7,):
        base[0], deltas[0][0] = -0.0, -0.0  # -0 · w + ... must stay -0 with one model
        base[1], deltas[-1][2] = float("inf"), float("nan")
        base[3], deltas[0][3] = 3e38, 3e38  # overflows to inf
        base[4], deltas[0][4] = 0.0, 1e-42  # subnormal
    weight = [1.0, 0.8, -0.6, 0.3, 1.7][:n_models]
    for lam in (1.0, 0.3):
        fused, plain = _both(
            base,
            deltas,
            monkeypatch,
            combine=linear_combine_,
            weight=weight,
            lambda_=lam,
            normalize=normalize,
        )
        assert torch.equal(fused.view(torch.int32), plain.view(torch.int32))


def test_fused_linear_hand_computed_and_tiny_weight_sum_not_divided():
    """base + λ·Σ w_i δ_i [/ Σ w_i]: 1 + 0.5·(2·1 + 4·0.5) = 3 (no normalize); normalized by
    Σw = 1.5: 1 + 0.5·4/1.5; |Σw| < 1e-8 is not divided by."""
    base, deltas = torch.tensor([1.0]), [torch.tensor([2.0]), torch.tensor([4.0])]
    out = linear_combine_(base.clone(), deltas, [1.0, 0.5], lambda_=0.5)
    assert out.item() == 3.0
    f32 = np.float32
    out = linear_combine_(base.clone(), deltas, [1.0, 0.5], lambda_=0.5, normalize=True)
    assert out.item() == f32(1) + f32(0.5) * (f32(4) / f32(1.5))  # 2.3333335
    out = linear_combine_(base.clone(), deltas, [2e-9, 1e-9], lambda_=1e8, normalize=True)
    assert out.item() == f32(1) + f32(1e8) * (f32(2) * f32(2e-9) + f32(4) * f32(1e-9))  # ≈ 1.8
    assert _common._linear_kernel_applies(base, deltas)
    assert not _common._linear_kernel_applies(base.double(), [d.double() for d in deltas])
