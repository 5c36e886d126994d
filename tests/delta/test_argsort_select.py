"""The O(n) reproduction of torch.argsort's top-k selection against the real argsort."""

import itertools

import pytest
import torch

from splice.delta import argsort_select
from splice.delta.argsort_select import argsort_topk_mask


def _reference(x: torch.Tensor, k: int) -> torch.Tensor:
    out = torch.zeros(x.numel(), dtype=torch.bool)
    out[torch.argsort(x, descending=True)[:k]] = True
    return out


def test_self_check_passes_on_this_build():
    assert argsort_select._self_check()


@pytest.mark.parametrize("kind", ["bf16-like", "few-values", "distinct"])
def test_same_selection_as_argsort(kind):
    g = torch.Generator().manual_seed({"bf16-like": 0, "few-values": 1, "distinct": 2}[kind])
    for _ in range(60):
        n = int(torch.randint(1, 20000, (1,), generator=g))
        if kind == "bf16-like":
            x = (torch.randn(n, generator=g) * 0.002).bfloat16().float().abs()
        elif kind == "few-values":
            x = torch.randint(0, 3, (n,), generator=g).float()
        else:
            x = torch.randn(n, generator=g).abs()
        k = int(torch.randint(0, n + 1, (1,), generator=g))
        assert torch.equal(argsort_topk_mask(x, k), _reference(x, k)), (kind, n, k)


def test_keeps_exactly_k_and_the_largest():
    x = torch.tensor([1.0, 3.0, 3.0, 2.0, 3.0, 0.0] * 10)
    m = argsort_topk_mask(x, 25)
    assert int(m.sum()) == 25
    assert bool((x[m] == 3.0).all())  # 30 entries equal 3.0: all 25 kept are among them


def test_nan_falls_back_to_the_real_sort():
    x = torch.tensor([1.0, float("nan"), 2.0] * 10)
    assert torch.equal(argsort_topk_mask(x, 7), _reference(x, 7))


# -- the compiled extension and the numpy fallback ---------------------------------------

compiled = pytest.mark.skipif(
    argsort_select._introselect is None, reason="C extension not built (no compiler)"
)


def _adversarial(seed: int) -> list[tuple[torch.Tensor, int]]:
    """Tie-heavy inputs: bf16-rounded magnitudes (as a bf16 task vector gives), a handful
    of distinct values, all equal, sorted runs, exact zeros; k anywhere, also next to the
    ends and inside the last 16-entry partition."""
    g = torch.Generator().manual_seed(seed)
    cases = []
    for trial in range(15):
        n = int(torch.randint(17, 20000, (1,), generator=g))
        kind = trial % 5
        if kind == 0:
            x = (torch.randn(n, generator=g) * 0.002).bfloat16().abs().float()
        elif kind == 1:
            x = torch.randint(0, 3, (n,), generator=g).float()
        elif kind == 2:
            x = torch.full((n,), 0.5)
        elif kind == 3:  # sorted blocks of bf16 values, ascending then descending
            x = (torch.randn(n, generator=g) * 0.01).bfloat16().abs().float().sort().values
            x[n // 2 :] = x[n // 2 :].flip(0)
        else:  # mostly zeros (a sparse task vector) with bf16 values
            x = (torch.randn(n, generator=g) * 0.002).bfloat16().abs().float()
            x[torch.rand(n, generator=g) < 0.7] = 0
        for k in (1, n - 1, int(torch.randint(1, n, (1,), generator=g)), n // 2 + 3):
            cases.append((x, k))
    return cases


@compiled
def test_compiled_passes_its_self_check():
    assert argsort_select.selection_path() == "compiled"


@compiled
@pytest.mark.parametrize("seed", [0, 1])
def test_compiled_and_python_select_what_argsort_selects(seed):
    for x, k in _adversarial(seed):
        want = _reference(x, k)
        got_c = argsort_topk_mask(x, k, path="compiled")
        got_py = argsort_topk_mask(x, k, path="python")
        assert torch.equal(got_c, got_py), (x.numel(), k)
        assert torch.equal(got_c, want), (x.numel(), k)


@compiled
def test_compiled_on_a_bf16_weight_sized_delta():
    """A 256 x 1024 bf16 task vector, trimmed to densities 0.2 / 0.3 / 0.5 (mergekit's
    keep count): the compiled selection is torch's."""
    g = torch.Generator().manual_seed(7)
    d = (
        (
            (torch.randn(256, 1024, generator=g) * 0.02).bfloat16()
            - (torch.randn(256, 1024, generator=g) * 0.02).bfloat16()
        )
        .abs()
        .float()
        .reshape(-1)
    )
    for density in (0.2, 0.3, 0.5):
        k = int(density * d.numel())
        assert torch.equal(argsort_topk_mask(d, k, path="compiled"), _reference(d, k))


def test_without_the_extension_the_numpy_path_is_used(monkeypatch):
    monkeypatch.setattr(argsort_select, "_introselect", None)
    argsort_select.selection_path.cache_clear()
    try:
        assert argsort_select.selection_path() == "python"
        x = torch.tensor([2.0, 1.0, 2.0, 2.0] * 10)
        assert torch.equal(argsort_topk_mask(x, 13), _reference(x, 13))
    finally:
        argsort_select.selection_path.cache_clear()


@compiled
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_trim_in_place_equals_delta_times_mask(dtype):
    """The fused trim zeroes what ``delta * mask`` zeroes (signed zeros included), the
    mask being torch's argsort top-k of |delta| in float32."""
    g = torch.Generator().manual_seed(3)
    for n, density in ((5000, 0.2), (20000, 0.3), (777, 0.5)):
        delta = (torch.randn(n, generator=g) * 0.003).to(dtype)
        delta[:50] = 0.0
        k = int(density * n)
        want = delta * _reference(delta.float().abs(), k).to(dtype)
        got = delta.clone()
        assert argsort_select.trim_like_argsort_(got, k)
        assert torch.equal(got.float().view(torch.int32), want.float().view(torch.int32))


@compiled
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_trim_into_a_reused_work_buffer_equals_its_own_allocation(dtype):
    """The compiled trim's (value, index) pairs and keep bytes in a caller's buffer of 9n
    bytes (a reused scratch tensor, `splice.io.scratch`), left dirty by an earlier use: the
    same zeros as with its own allocation; a buffer under 9n bytes is refused."""
    from splice.delta import _introselect

    g = torch.Generator().manual_seed(5)
    n, k = 6000, 1500
    delta = (torch.randn(n, generator=g) * 0.003).to(dtype)
    delta[:40] = 0.0
    view = torch.int32 if dtype == torch.float32 else torch.int16
    own, into = delta.clone(), delta.clone()
    assert _introselect.torch_sort_trim(own.view(view).numpy(), k, delta.element_size())
    work = torch.full((9 * n,), 0xA5, dtype=torch.uint8)  # dirty: the keep bytes are reset
    for _ in range(2):
        into.copy_(delta)
        assert _introselect.torch_sort_trim(
            into.view(view).numpy(), k, delta.element_size(), work.numpy()
        )
        assert torch.equal(into.view(view), own.view(view))
    assert int((own != 0).sum()) == k
    with pytest.raises(ValueError, match="9n"):
        _introselect.torch_sort_trim(
            into.view(view).numpy(), k, delta.element_size(), work[: 9 * n - 1].numpy()
        )


@compiled
def test_trim_with_an_extension_built_before_its_work_buffer(monkeypatch):
    """An extension built before ``torch_sort_trim`` took a work buffer (three arguments)
    still trims, allocating its own scratch."""
    from splice.delta import _introselect

    class Old:
        def torch_sort_trim(self, buf, k, itemsize):
            """torch_sort_trim(delta, k, itemsize) -> bool"""
            return _introselect.torch_sort_trim(buf, k, itemsize)

    g = torch.Generator().manual_seed(9)
    delta = torch.randn(3000, generator=g)
    want = delta.clone()
    assert argsort_select.trim_like_argsort_(want, 700)
    monkeypatch.setattr(argsort_select, "_introselect", Old())
    argsort_select._trim_takes_work.cache_clear()
    try:
        got = delta.clone()
        assert argsort_select.trim_like_argsort_(got, 700)
        assert torch.equal(got, want)
    finally:
        monkeypatch.undo()
        argsort_select._trim_takes_work.cache_clear()
    assert argsort_select._trim_takes_work()


def test_trim_declines_what_it_cannot_do():
    x = torch.tensor([1.0, float("nan"), 2.0, 3.0] * 8)
    assert not argsort_select.trim_like_argsort_(x.clone(), 5)  # NaN: the mask path
    assert not argsort_select.trim_like_argsort_(x.half(), 5)  # float16: the mask path
    assert not argsort_select.trim_like_argsort_(torch.ones(8), 8)  # k = n: nothing to trim


@compiled
@pytest.mark.parametrize("seed", [0, 1])
def test_pairs_filled_in_slices_select_what_argsort_selects(seed):
    """`select_pairs_packed` on (value, flat index) pairs filled in three uneven slices (as
    the chunked trim fills them a chunk of rows at a time): the packed mask is torch's
    argsort top-k, bit for bit, on the tie-heavy inputs."""
    np = pytest.importorskip("numpy")
    for x, k in _adversarial(seed):
        n = x.numel()
        pairs = np.empty(n, dtype=argsort_select.PAIR)
        cuts = [0, n // 3, n // 3 + 7, n]
        for a, b in itertools.pairwise(cuts):
            pairs["v"][a:b] = x[a:b].numpy()
            pairs["i"][a:b] = np.arange(a, b, dtype=np.uint32)
        bits = argsort_select.select_pairs_packed(pairs, k)
        assert bits is not None and len(bits) == -(-n // 8)
        got = torch.from_numpy(np.unpackbits(bits, count=n).astype(bool))
        assert torch.equal(got, _reference(x, k)), (n, k)


def test_pairs_selection_declines_what_it_cannot_do(monkeypatch):
    np = pytest.importorskip("numpy")
    pairs = np.zeros(40, dtype=argsort_select.PAIR)
    assert argsort_select.select_pairs_packed(pairs, 0) is None  # k outside (0, n)
    assert argsort_select.select_pairs_packed(pairs, 40) is None
    assert argsort_select.select_pairs_packed(np.zeros(40, dtype=np.float32), 5) is None
    monkeypatch.setattr(argsort_select, "_introselect", None)
    assert not argsort_select.pairs_selectable(40)
    assert argsort_select.select_pairs_packed(pairs, 5) is None


@compiled
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("where", [0, 17, 999])
def test_the_compiled_trim_finds_nan_itself(dtype, where):
    """API_VERSION 3: the extension declines a δ with a NaN anywhere (either sign) and
    leaves it untouched, without the torch pass before it; `trim_torch_sort_` then gives
    the mask path's result."""
    from splice.delta import _introselect
    from splice.delta.topk import magnitude, mask_, topk_mask, trim_torch_sort_

    assert _introselect.API_VERSION >= 3
    x = torch.randn(1000, generator=torch.Generator().manual_seed(where)).to(dtype)
    for nan in (float("nan"), -float("nan")):
        y = x.clone()
        y[where] = nan
        before = y.clone()
        bits = y.view(torch.int32 if dtype == torch.float32 else torch.int16).numpy()
        work = torch.empty(9 * 1000, dtype=torch.uint8).numpy()
        assert not _introselect.torch_sort_trim(bits, 300, y.element_size(), work)
        assert torch.equal(y.view(torch.uint8), before.view(torch.uint8))
        want = mask_(before.clone(), topk_mask(magnitude(before), 300, "torch_sort"))
        got = trim_torch_sort_(y, 300)
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))


def test_fill_pairs_compiled_and_numpy_agree(monkeypatch):
    """`fill_pairs` in slices gives (value, flat index) pairs, the compiled pass and numpy's
    the same bytes; a NaN in a slice is refused by both."""
    np = pytest.importorskip("numpy")
    values = torch.randn(1000, generator=torch.Generator().manual_seed(4))
    for compiled_pass in (True, False):
        if not compiled_pass:
            monkeypatch.setattr(argsort_select, "_introselect", None)
        pairs = np.zeros(1000, dtype=argsort_select.PAIR)
        for a, b in ((0, 1), (1, 400), (400, 1000)):
            assert argsort_select.fill_pairs(pairs, values[a:b], a)
        assert np.array_equal(pairs["v"], values.numpy())
        assert np.array_equal(pairs["i"], np.arange(1000, dtype=np.uint32))
        bad = values[10:20].clone()
        bad[3] = float("nan")
        assert not argsort_select.fill_pairs(pairs, bad, 10)
    monkeypatch.undo()
    if argsort_select._introselect is not None:
        assert hasattr(argsort_select._introselect, "fill_pairs")
