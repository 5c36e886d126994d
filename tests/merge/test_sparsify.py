import math

import pytest
import torch

from splice.delta.topk import band_mask_rows, keep_count, kth_largest, topk_mask, topk_mask_rows
from splice.merge import KeepRule
from splice.merge.sparsify import (
    drop_,
    keep_rule_mask,
    l1_sum,
    l1_work,
    rescale_inverse,
    rescale_l1,
    rows_view,
)

T, F = True, False


def bools(*xs):
    return torch.tensor(xs, dtype=torch.bool)


@pytest.mark.parametrize(
    ("n", "density", "dialect", "expected"),
    [
        (10, 0.33, "splice", 3),
        (10, 0.38, "splice", 4),  # rounds
        (10, 0.25, "splice", 2),  # round half to even
        (10, 0.35, "splice", 4),  # 3.5 -> 4
        (10, 0.04, "splice", 0),  # may keep none
        (10, 1.0, "splice", 10),
        (10, 0.0, "splice", 0),
        (10, 0.38, "mergekit", 3),  # truncates
        (10, 0.04, "mergekit", 1),  # keeps at least one
        (100, 0.29, "mergekit", 28),  # int(28.999999999999996)
        (10, 1.0, "mergekit", 10),
        (10, 0.0, "mergekit", 0),
        (0, 0.5, "mergekit", 0),
    ],
)
def test_keep_count(n, density, dialect, expected):
    assert keep_count(n, density, dialect) == expected


def test_topk_mask_fills_ties_in_flat_order():
    mag = torch.tensor([1.0, 3.0, 3.0, 2.0, 3.0, 0.0])
    assert torch.equal(topk_mask(mag, 2), bools(F, T, T, F, F, F))
    assert torch.equal(topk_mask(mag, 3), bools(F, T, T, F, T, F))
    assert torch.equal(topk_mask(mag, 4), bools(F, T, T, T, T, F))
    assert torch.equal(topk_mask(mag, 0), bools(F, F, F, F, F, F))
    assert torch.equal(topk_mask(mag, 6), bools(T, T, T, T, T, T))


def test_topk_mask_2d_is_row_major():
    mag = torch.tensor([[5.0, 1.0], [5.0, 5.0]])
    assert torch.equal(topk_mask(mag, 2), torch.tensor([[T, F], [T, F]]))
    assert torch.equal(topk_mask(mag, 3), torch.tensor([[T, F], [T, T]]))


def test_topk_mask_rows():
    mag = torch.tensor([[1.0, 2.0, 2.0, 0.0], [4.0, 4.0, 4.0, 4.0], [0.0, 9.0, 1.0, 8.0]])
    expected = torch.tensor([[F, T, T, F], [T, T, F, F], [F, T, F, T]])
    assert torch.equal(topk_mask_rows(mag, 2), expected)


def test_topk_mask_exact_count_with_many_ties():
    g = torch.Generator().manual_seed(0)
    mag = torch.randint(0, 4, (7, 33), generator=g).float()
    for k in range(0, mag.numel() + 1, 7):
        m = topk_mask(mag, k)
        assert int(m.sum()) == k
        if 0 < k < mag.numel():
            assert mag[m].min() >= mag[~m].max()
    for k in range(0, 34, 5):
        m = topk_mask_rows(mag, k)
        assert m.sum(dim=1).tolist() == [k] * 7


def test_kth_largest():
    x = torch.tensor([0.5, 2.0, 0.0, 2.0, 1.0, 2.0, 7.0])
    assert kth_largest(x, 1) == (7.0, 0, 1)
    assert kth_largest(x, 2) == (2.0, 1, 3)
    assert kth_largest(x, 4) == (2.0, 1, 3)
    assert kth_largest(x, 5) == (1.0, 4, 1)
    assert kth_largest(x, 7) == (0.0, 6, 1)
    big = torch.tensor([1e-30, 3.0e38, float("inf"), 1.0000001, 1.0])
    assert kth_largest(big, 1) == (float("inf"), 0, 1)
    assert kth_largest(big, 3) == (1.0000001192092896, 2, 1)


def reference_topk(mag, k):
    """First k of a stable descending sort: largest first, ties in flat order."""
    order = torch.sort(mag.reshape(-1), descending=True, stable=True).indices[:k]
    mask = torch.zeros(mag.numel(), dtype=torch.bool)
    mask[order] = True
    return mask.reshape(mag.shape)


@pytest.mark.parametrize("levels", [3, 50, 0])
def test_topk_mask_matches_stable_sort(levels):
    g = torch.Generator().manual_seed(levels)
    for trial in range(20):
        shape = (int(torch.randint(1, 9, (1,), generator=g)), 57)
        if levels:  # many ties
            mag = torch.randint(0, levels, shape, generator=g).float() / 7
        else:  # distinct values over many binades, plus zeros
            mag = torch.randn(shape, generator=g).abs() * 10.0 ** (trial % 7 - 3)
            mag[0, :5] = 0.0
        for k in [1, 2, mag.numel() // 3, mag.numel() // 2, mag.numel() - 1]:
            assert torch.equal(topk_mask(mag, k), reference_topk(mag, k))
            rows = torch.stack([reference_topk(r, min(k, 57)) for r in mag])
            assert torch.equal(topk_mask_rows(mag, min(k, 57)), rows)


def test_torch_sort_tie_order_only_when_ties_straddle():
    g = torch.Generator().manual_seed(3)
    tied = torch.randint(0, 4, (500,), generator=g).float()
    by_sort = torch.zeros(500, dtype=torch.bool)
    by_sort[torch.argsort(tied, descending=True)[:200]] = True
    assert torch.equal(topk_mask(tied, 200, "torch_sort"), by_sort)
    assert int(topk_mask(tied, 200).sum()) == 200
    # k on a value boundary: no tie to break, both rules give the same mask
    k = int((tied >= 2).sum())
    assert torch.equal(topk_mask(tied, k, "torch_sort"), tied >= 2)
    assert torch.equal(
        band_mask_rows(tied.reshape(1, -1), 10, 190, "torch_sort")[0],
        torch.zeros(500, dtype=torch.bool).index_fill_(0, torch.sort(tied).indices[300:490], True),
    )


def test_keep_rule_mask():
    mag = torch.tensor([0.5, 0.2, 0.5, 0.9, 0.5])
    assert torch.equal(keep_rule_mask(mag, KeepRule(0.5, 0)), bools(F, F, F, T, F))
    assert torch.equal(keep_rule_mask(mag, KeepRule(0.5, 1)), bools(T, F, F, T, F))
    assert torch.equal(keep_rule_mask(mag, KeepRule(0.5, 2)), bools(T, F, T, T, F))
    assert torch.equal(keep_rule_mask(mag, KeepRule(-1.0, 0)), bools(T, T, T, T, T))
    assert torch.equal(keep_rule_mask(mag, KeepRule(math.inf, 0)), bools(F, F, F, F, F))
    mag2 = torch.tensor([[0.5, 0.1], [0.5, 0.7]])
    assert torch.equal(keep_rule_mask(mag2, KeepRule(0.5, 1)), torch.tensor([[T, F], [F, T]]))


def test_rescale_l1():
    orig = torch.tensor([1.0, -2.0, 3.0, -4.0])
    masked = torch.tensor([0.0, 0.0, 3.0, -4.0])
    out = rescale_l1(orig.abs().sum(), masked)
    torch.testing.assert_close(out, torch.tensor([0.0, 0.0, 30 / 7, -40 / 7]))
    zero = torch.zeros(3)
    assert torch.equal(rescale_l1(10.0, zero), torch.zeros(3))
    tiny = torch.tensor([1e-8, 0.0])
    assert torch.equal(rescale_l1(5.0, tiny.clone()), tiny)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_l1_sum_in_a_shared_work_buffer(dtype):
    """`l1_sum` with `l1_work`'s buffer gives the bits of ``x.abs().sum()`` in torch's order
    (several sizes through one buffer, each summing only its own entries), and leaves x."""
    xs = [torch.tensor([1.5, -2.0, 0.25], dtype=dtype), torch.tensor([[-3.0, 4.0]], dtype=dtype)]
    work = l1_work(xs)
    assert work is not None and work.shape == (3,) and work.dtype == dtype
    assert [float(l1_sum(x, 1, work)) for x in xs] == [3.75, 7.0]
    assert [float(l1_sum(x, 1, work)) for x in reversed(xs)] == [7.0, 3.75]
    assert xs[0].tolist() == [1.5, -2.0, 0.25]
    gen = torch.Generator().manual_seed(0)
    big = [(torch.randn(70_001, generator=gen) * 0.01).to(dtype) for _ in range(2)]
    work = l1_work(big)
    for x in big:
        for threads in (1, 2, 3):
            assert torch.equal(l1_sum(x, threads, work), l1_sum(x, threads))
    assert l1_work([]) is None
    assert l1_work([torch.ones(2, requires_grad=True)]) is None


def test_drop_per_entry_probabilities_and_given_l1():
    keep = bools(T, F, T, T)

    def drop(rescale, **kw):
        return drop_(torch.tensor([2.0, -4.0, 1.0, -3.0]), keep, rescale, **kw)

    prob = torch.tensor([0.5, 0.5, 0.25, 0.75])
    assert torch.equal(drop("inverse", keep_prob=prob), torch.tensor([4.0, 0.0, 4.0, -4.0]))
    assert torch.equal(drop("none", keep_prob=prob), torch.tensor([2.0, 0.0, 1.0, -3.0]))
    # |δ|_1 = 10, kept 6: x 10/6; a given l1 (12) is used instead of measuring: x 2
    torch.testing.assert_close(drop(True), torch.tensor([2.0, 0.0, 1.0, -3.0]) * (10 / 6))
    assert torch.equal(drop("l1", l1=torch.tensor(12.0)), torch.tensor([4.0, 0.0, 2.0, -6.0]))


def test_rescale_inverse():
    out = rescale_inverse(torch.tensor([0.0, 2.0, 0.0, 4.0]), 0.5)
    assert torch.equal(out, torch.tensor([0.0, 4.0, 0.0, 8.0]))
    assert torch.equal(rescale_inverse(torch.tensor([1.0]), 1.0), torch.tensor([1.0]))


def test_band_mask_rows():
    mag = torch.tensor([[1.0, 6.0, 3.0, 5.0, 2.0, 4.0]])
    # drop the largest (6), keep the next three (5, 4, 3)
    assert torch.equal(band_mask_rows(mag, 1, 3), torch.tensor([[F, F, T, T, F, T]]))
    assert torch.equal(band_mask_rows(mag, 0, 2), torch.tensor([[F, T, F, T, F, F]]))


def test_rows_view():
    assert rows_view(torch.zeros(5)).shape == (1, 5)
    x = torch.arange(24.0).reshape(2, 3, 4)
    assert torch.equal(rows_view(x)[4], torch.tensor([16.0, 17.0, 18.0, 19.0]))
    assert rows_view(torch.tensor(1.0)).shape == (1, 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_keep_rule_trim_equals_the_mask_path(dtype):
    """`keep_rule_trim_` keeps what `keep_rule_mask` keeps (|δ| > t, then the first quota
    entries equal to t in flat order; the zeros with δ's sign), bit for bit, for thresholds
    inside the values, at 0 and at +inf; a non-finite δ is left to the torch path."""
    from splice.merge import sparsify

    if getattr(sparsify._radix_kernel, "apply_keep_rule", None) is None:
        pytest.skip("the _radix_kernel extension is not built")
    g = torch.Generator().manual_seed(8)
    delta = (torch.randn(40, 50, generator=g) * 0.01).to(dtype)  # bf16: many ties
    delta[0, :7] = 0.0
    delta[1, :5] = -0.0
    mag = delta.abs().float().reshape(-1)
    t = float(mag.sort().values[1200])
    ties = int((mag == t).sum())
    for rule in (
        KeepRule(t, 0),
        KeepRule(t, min(2, ties)),
        KeepRule(t, ties),
        KeepRule(0.0, 3),
        KeepRule(float("inf"), 0),
    ):
        want = delta * keep_rule_mask(delta.abs().float(), rule)
        got = delta.clone()
        assert sparsify.keep_rule_trim_(got, rule)
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)), rule
    bad = delta.clone()
    bad[3, 3] = float("inf")
    before = bad.clone()
    assert not sparsify.keep_rule_trim_(bad, KeepRule(t, 1))
    assert torch.equal(bad.view(torch.uint8), before.view(torch.uint8))
    assert not sparsify.keep_rule_trim_(delta.clone(), KeepRule(-1.0, 0))  # keep all: torch
