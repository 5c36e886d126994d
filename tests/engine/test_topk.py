"""Exact whole-model top-k by radix selection, checked against a brute-force sort."""

import torch

from splice.engine.topk import keep_rules
from splice.merge import KeepRule, TopKThreshold


def _apply(mag: torch.Tensor, rule: KeepRule) -> torch.Tensor:
    flat = mag.reshape(-1)
    keep = flat > rule.threshold
    eq = (flat == rule.threshold).nonzero().reshape(-1)[: rule.tie_quota]
    keep[eq] = True
    return keep


def _run(tensors: list[list[torch.Tensor]], densities: list[float], threads: int = 1):
    """tensors[job][model] are magnitudes."""
    reqs = [TopKThreshold(i, d) for i, d in enumerate(densities)]
    rules = keep_rules(
        reqs,
        range(len(tensors)),
        lambda j: tensors[j][0].numel(),
        lambda j: tensors[j],
        threads=threads,
    )
    return reqs, rules


def test_exact_count_matches_sort_on_random_values():
    g = torch.Generator().manual_seed(0)
    jobs = [
        [torch.randn(n, generator=g).abs(), torch.randn(n, generator=g).abs()]
        for n in (100, 37, 1000, 5)
    ]
    reqs, rules = _run(jobs, [0.1, 0.55], threads=2)
    total = sum(j[0].numel() for j in jobs)
    for mi, d in enumerate([0.1, 0.55]):
        k = round(d * total)
        kept = torch.cat([_apply(jobs[j][mi], rules[j][reqs[mi]]) for j in range(len(jobs))])
        assert int(kept.sum()) == k
        allmag = torch.cat([jobs[j][mi] for j in range(len(jobs))])
        kth = allmag.sort(descending=True).values[k - 1]
        # every kept value is >= the k-th largest, every dropped one <= it
        assert bool((allmag[kept] >= kth).all()) and bool((allmag[~kept] <= kth).all())


def test_ties_are_filled_in_plan_order_to_exactly_k():
    # 10 entries all equal: density 0.35 -> keep round(3.5)=4 (banker's rounding), first in order
    jobs = [[torch.full((3,), 2.0)], [torch.full((4,), 2.0)], [torch.full((3,), 2.0)]]
    (req,), rules = _run(jobs, [0.35])
    kept = [_apply(jobs[j][0], rules[j][req]).tolist() for j in range(3)]
    assert kept == [[True, True, True], [True, False, False, False], [False, False, False]]


def test_hand_computed_threshold_and_quota():
    # magnitudes 5,4,4,3 | 4,1 ; keep k=round(0.5*6)=3 -> the 5 and two of the three 4s
    jobs = [[torch.tensor([5.0, 4.0, 4.0, 3.0])], [torch.tensor([4.0, 1.0])]]
    (req,), rules = _run(jobs, [0.5])
    assert rules[0][req] == KeepRule(4.0, 2)  # both of its 4s come first in plan order
    assert rules[1][req] == KeepRule(4.0, 0)


def test_density_zero_and_one():
    jobs = [[torch.tensor([0.0, 1.0, 2.0])]]
    (q0,), r0 = _run(jobs, [0.0])
    (q1,), r1 = _run(jobs, [1.0])
    assert int(_apply(jobs[0][0], r0[0][q0]).sum()) == 0
    assert int(_apply(jobs[0][0], r1[0][q1]).sum()) == 3


def test_values_spanning_binades_and_zeros():
    mags = [torch.tensor([0.0, 0.0, 1e-30, 3e-8, 1.0, 1e20, 0.5, 0.25])]
    (req,), rules = _run([mags], [0.5])
    kept = _apply(mags[0], rules[0][req])
    assert kept.tolist() == [False, False, False, False, True, True, True, True]


def test_compiled_histograms_equal_torchs(monkeypatch):
    """The compiled radix histograms (one pass) and torch's (isnan, shift, bincount) give
    the same counts, over all values and inside a bucket, with zeros, ties and several
    binades; NaN is an error in both."""
    import pytest

    from splice.delta import topk as topk_mod
    from splice.engine import topk

    if getattr(topk_mod._radix_kernel, "radix_histogram", None) is None:
        pytest.skip("the _radix_kernel extension is not built")
    g = torch.Generator().manual_seed(3)
    mag = (torch.randn(50_000, generator=g) * 4).exp().bfloat16().float()  # ties, binades
    mag[::97] = 0.0
    compiled_high = topk._histogram(mag, None)
    bucket = int(compiled_high.argmax())
    compiled_low = topk._histogram(mag, bucket)
    assert int(compiled_high.sum()) == mag.numel() and int(compiled_low.sum()) > 1
    bad = mag.clone()
    bad[123] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        topk._histogram(bad, None)
    monkeypatch.setattr(topk_mod, "_radix_kernel", None)
    assert torch.equal(topk._histogram(mag, None), compiled_high)
    assert torch.equal(topk._histogram(mag, bucket), compiled_low)
    with pytest.raises(ValueError, match="NaN"):
        topk._histogram(bad, bucket)
