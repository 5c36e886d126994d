"""Whole-vector sums and norms in torch's order for a given thread count
(`splice.merge.reductions`): the same bits as torch's own op run with that many intra-op
threads, whatever the thread count of the caller."""

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch

from splice.errors import RecipeError
from splice.merge.reductions import (
    GRAIN,
    THREADS_ENV,
    mergekit_threads,
    norm_last,
    sum_last,
)


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


# below the grain (serial), at it, above it (2-4 ranges, a shorter last range), several
# rows (split over the outputs, so any thread count gives the serial rows)
SHAPES = [(GRAIN - 1,), (GRAIN,), (1, 40_000), (65_537,), (1, 1, 100_003), (3, 50_000)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("threads", [1, 2, 3, 4])
def test_same_bits_as_torch_with_that_many_threads(dtype, shape, threads):
    g = torch.Generator().manual_seed(len(shape) * 7 + shape[-1])
    x = (torch.randn(shape, generator=g) * 0.05).to(dtype)
    with torch_threads(threads):
        want_sum, want_norm = x.sum(dim=-1), torch.norm(x, dim=-1)
    for caller in (1, 2):  # the caller's own thread count does not matter
        with torch_threads(caller):
            got_sum, got_norm = sum_last(x, threads), norm_last(x, threads)
        assert got_sum.dtype == dtype and got_sum.shape == want_sum.shape
        assert got_norm.dtype == dtype and got_norm.shape == want_norm.shape
        assert torch.equal(got_sum, want_sum)
        assert torch.equal(got_norm, want_norm)


def test_bf16_sum_rounds_each_threads_range():
    """Hand-computed: 2^16 bfloat16 entries, 1 + 3·2^-10 in the first half and 3·2^-10 in
    the second. One thread adds all in float32, 1 + 6·2^-10, and rounds once to bfloat16
    (ulp 2^-7 at 1): 1 + 2^-7. Two threads round each half first: 1 + 3·2^-10 -> 1 and
    3·2^-10, then 1 + 3·2^-10 -> 1."""
    x = torch.zeros(2 * GRAIN, dtype=torch.bfloat16)
    x[0], x[1], x[GRAIN + 5] = 1.0, 3 * 2**-10, 3 * 2**-10
    assert sum_last(x, 1).item() == 1 + 2**-7
    assert sum_last(x, 2).item() == 1.0
    for threads, want in ((1, 1 + 2**-7), (2, 1.0)):
        with torch_threads(threads):
            assert x.sum(dim=-1).item() == want  # torch itself


def test_thread_count_setting(monkeypatch):
    monkeypatch.setenv(THREADS_ENV, "3")
    assert mergekit_threads() == 3
    monkeypatch.setenv(THREADS_ENV, "0")
    with pytest.raises(RecipeError, match=THREADS_ENV):
        mergekit_threads()
    monkeypatch.delenv(THREADS_ENV)
    assert mergekit_threads() >= 1
