"""The O(n) reproduction of torch.argsort's top-k selection against the real argsort."""

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
