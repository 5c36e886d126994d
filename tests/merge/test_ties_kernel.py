"""The compiled float32 TIES combine against the torch ops it replaces: the same bits."""

import pytest
import torch

from splice.merge.methods import _common
from splice.merge.methods._common import ties_combine_

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


def _both(base, deltas, monkeypatch, **kw):
    fused = ties_combine_(base.clone(), [d.clone() for d in deltas], **kw)
    with monkeypatch.context() as m:
        m.setattr(_common, "_ties_kernel", None)
        plain = ties_combine_(base.clone(), [d.clone() for d in deltas], **kw)
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
