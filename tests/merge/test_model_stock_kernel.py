"""mergekit's Model Stock in float32 with its elementwise steps compiled
(`_model_stock_kernel`) against the torch ops they replace: the same bits."""

from types import SimpleNamespace

import pytest
import torch

from splice.merge.methods import _mergekit_precision as mp

pytestmark = pytest.mark.skipif(
    mp._model_stock_kernel is None, reason="C extension not built (no compiler)"
)


def _run(base, tensors, filter_wise, monkeypatch, kernel):
    with monkeypatch.context() as m:
        if not kernel:
            m.setattr(mp, "_model_stock_kernel", None)
        return mp.model_stock_in_dtype(base.clone(), [t.clone() for t in tensors], filter_wise)


@pytest.fixture
def kernel_calls(monkeypatch):
    """The kernel's entry points, counted."""
    real, calls = mp._model_stock_kernel, []

    def counted(name):
        def call(*args):
            calls.append(name)
            return getattr(real, name)(*args)

        return call

    spy = SimpleNamespace(**{n: counted(n) for n in ("average_offsets", "interpolate")})
    monkeypatch.setattr(mp, "_model_stock_kernel", spy)
    return calls


@pytest.mark.parametrize("n", [2, 3, 5])
@pytest.mark.parametrize("shape", [(1,), (7,), (40_000,), (33, 65), (3, 4, 9000)])
@pytest.mark.parametrize("filter_wise", [False, True])
def test_compiled_steps_give_torchs_bits(monkeypatch, n, shape, filter_wise):
    g = torch.Generator().manual_seed(n * 10 + len(shape))
    base = torch.randn(shape, generator=g)
    tensors = [base + torch.randn(shape, generator=g) * 0.01 for _ in range(n)]
    if shape == (7,):
        base[0], tensors[0][0] = -0.0, -0.0
        tensors[0][1], tensors[1][1] = 3e38, 3e38  # the sum overflows to inf
        tensors[-1][2] = 1e-42  # subnormal
    fused = _run(base, tensors, filter_wise, monkeypatch, kernel=True)
    plain = _run(base, tensors, filter_wise, monkeypatch, kernel=False)
    assert torch.equal(fused.view(torch.int32), plain.view(torch.int32))


def test_kernel_runs_for_float32_only(monkeypatch, kernel_calls):
    base = torch.randn(4, 8)
    tensors = [base + 0.1 * torch.randn(4, 8) for _ in range(3)]
    mp.model_stock_in_dtype(base.clone(), [t.clone() for t in tensors], True)
    assert kernel_calls == ["average_offsets", "interpolate"]
    mp.model_stock_in_dtype(base.bfloat16(), [t.bfloat16() for t in tensors], True)
    assert kernel_calls == ["average_offsets", "interpolate"]  # bf16: torch's ops


def test_hand_computed():
    """θ0 = (1, 1), θ1 = (2, 1), θ2 = (1, 3): task vectors (1, 0) and (0, 2), cos = 0, so
    t = 2·0 / (1 + 0) = 0 and the merge is θ0. Per row (filter_wise) with rows θ0 = [[1, 1],
    [0, 0]], θ1 = [[2, 2], [1, 0]], θ2 = [[3, 3], [0, 1]]: row 0's task vectors (1, 1) and
    (2, 2) have cos 1, t = 2 / 2 = 1 -> the mean (2.5, 2.5); row 1's (1, 0) and (0, 1) have
    cos 0, t = 0 -> (0, 0)."""
    out = mp.model_stock_in_dtype(
        torch.tensor([1.0, 1.0]), [torch.tensor([2.0, 1.0]), torch.tensor([1.0, 3.0])], False
    )
    assert torch.equal(out, torch.tensor([1.0, 1.0]))
    base = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    rows = [torch.tensor([[2.0, 2.0], [1.0, 0.0]]), torch.tensor([[3.0, 3.0], [0.0, 1.0]])]
    out = mp.model_stock_in_dtype(base, rows, True)
    assert torch.equal(out, torch.tensor([[2.5, 2.5], [0.0, 0.0]]))
