"""`bench.memory.PeakRSS`: the growth of the resident set while its block runs, measured
after the heap's freed memory is given back (`engine.heap.trim_heap`)."""

import time

import torch

from splice.bench.memory import PeakRSS


def test_peak_rss_sees_a_touched_allocation():
    with PeakRSS() as m:
        x = torch.ones(25_000_000)  # 95.4 MiB, every page written
        # held for 25 sampling intervals: on a loaded machine the sampler thread may not run
        # during the fill itself (CI once read 85.5 MiB when x was freed at once)
        time.sleep(0.05)
        del x
    assert 90 <= m.mb <= 400


def test_peak_rss_of_an_empty_block_is_small():
    big = torch.ones(25_000_000)
    del big
    with PeakRSS() as m:
        pass
    assert m.mb < 20
