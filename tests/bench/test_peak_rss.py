"""`bench.memory.PeakRSS`: the growth of the resident set while its block runs, measured
after the heap's freed memory is given back (`engine.heap.trim_heap`)."""

import torch

from splice.bench.memory import PeakRSS


def test_peak_rss_sees_a_touched_allocation():
    with PeakRSS() as m:
        x = torch.ones(25_000_000)  # 100 MB, every page written
        del x
    assert 90 <= m.mb <= 400


def test_peak_rss_of_an_empty_block_is_small():
    big = torch.ones(25_000_000)
    del big
    with PeakRSS() as m:
        pass
    assert m.mb < 20
