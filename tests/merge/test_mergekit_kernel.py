"""mergekit's Model Stock in float32 with its elementwise steps compiled
(`_mergekit_kernel`) against the torch ops they replace: the same bits."""

from types import SimpleNamespace

import pytest
import torch

from splice.merge.methods import _mergekit_precision as mp

pytestmark = pytest.mark.skipif(
    mp._mergekit_kernel is None, reason="C extension not built (no compiler)"
)


def _run(base, tensors, filter_wise, monkeypatch, kernel):
    with monkeypatch.context() as m:
        if not kernel:
            m.setattr(mp, "_mergekit_kernel", None)
        return mp.model_stock_in_dtype(base.clone(), [t.clone() for t in tensors], filter_wise)


@pytest.fixture
def kernel_calls(monkeypatch):
    """The kernel's entry points, counted."""
    real, calls = mp._mergekit_kernel, []

    def counted(name):
        def call(*args):
            calls.append(name)
            return getattr(real, name)(*args)

        return call

    spy = SimpleNamespace(**{n: counted(n) for n in ("average_offsets", "interpolate")})
    monkeypatch.setattr(mp, "_mergekit_kernel", spy)
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


def _slerp(base, other, t, monkeypatch, kernel):
    with monkeypatch.context() as m:
        if not kernel:
            m.setattr(mp, "_mergekit_kernel", None)
        return mp.slerp_float32(base.clone(), other.clone(), t)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("size", [1, 7, 2 * mp.SLERP_CHUNK + 3])
@pytest.mark.parametrize("kind", ["spherical", "nearly parallel", "zero"])
def test_slerp_compiled_steps_give_torchs_bits(monkeypatch, dtype, size, kind):
    """SLERP's per-chunk product and mix, compiled, against torch's div / mul / add: the
    same bits, over several chunks, on the spherical and the linear branch, and with a zero
    input (norm <= eps counts as 1)."""
    g = torch.Generator().manual_seed(size)
    base = torch.randn(size, generator=g)
    other = {
        "spherical": torch.randn(size, generator=g),
        "nearly parallel": base * 1.0001,
        "zero": torch.zeros(size),
    }[kind]
    base, other = base.to(dtype), other.to(dtype)
    for t in (0.0, 0.3, 1.0):
        fused = _slerp(base, other, t, monkeypatch, kernel=True)
        plain = _slerp(base, other, t, monkeypatch, kernel=False)
        assert fused.dtype == dtype
        assert torch.equal(
            fused.view(torch.int16 if dtype != torch.float32 else torch.int32),
            plain.view(torch.int16 if dtype != torch.float32 else torch.int32),
        )


def test_slerp_uses_the_kernel(monkeypatch):
    real, calls = mp._mergekit_kernel, []
    spy = SimpleNamespace(
        slerp_product=lambda *a: (calls.append("product"), real.slerp_product(*a))[1],
        slerp_mix=lambda *a: (calls.append("mix"), real.slerp_mix(*a))[1],
    )
    monkeypatch.setattr(mp, "_mergekit_kernel", spy)
    mp.slerp_float32(torch.randn(10), torch.randn(10), 0.5)
    assert calls == ["product", "mix"]


def test_slerp_hand_computed():
    """a = (1, 0), b = (0, 1): θ = π/2, t = 0.5 -> sin(π/4) / sin(π/2) each: (√½, √½)."""
    out = mp.slerp_float32(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), 0.5)
    assert torch.allclose(out, torch.full((2,), 0.5**0.5), rtol=0, atol=1e-7)
