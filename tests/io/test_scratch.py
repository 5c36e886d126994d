"""The scratch pool (`splice.io.scratch`): a storage is handed out again only once no
tensor uses it, the pool stays within its cap and follows what is in use, and the module's
`empty` draws from the pool installed for a merge."""

from __future__ import annotations

import threading

import torch

from splice.io import scratch
from splice.io.scratch import GRAIN, ScratchPool

MIB = 1 << 20
F32_MIB = (MIB // 4,)  # a float32 tensor of one MiB


def _pool(cap: int = 64 * MIB) -> ScratchPool:
    return ScratchPool(cap, min_bytes=MIB)


def test_a_free_storage_is_handed_out_again():
    pool = _pool()
    a = pool.empty(F32_MIB, torch.float32)
    a.fill_(3.0)
    ptr = a.data_ptr()
    del a
    b = pool.empty((512, 512), torch.int32)  # the same bytes, another shape and dtype
    assert b.data_ptr() == ptr
    assert b.shape == (512, 512) and b.dtype == torch.int32 and b.is_contiguous()
    assert bool((b.view(torch.float32) == 3.0).all())  # the same pages, not zeroed
    assert (pool.made, pool.reused, pool.held) == (1, 1, MIB)


def test_a_storage_in_use_is_never_handed_out():
    pool = _pool()
    a = pool.empty(F32_MIB, torch.float32).fill_(1.0)
    view = a[10:]  # a view keeps the storage
    array = pool.empty(F32_MIB, torch.float32).fill_(2.0).numpy()  # so does a numpy array
    del a
    c = pool.empty(F32_MIB, torch.float32).fill_(7.0)
    assert c.data_ptr() not in (view.data_ptr() - 40, array.ctypes.data)
    assert bool((view == 1.0).all()) and bool((array == 2.0).all())
    assert (pool.made, pool.reused) == (3, 0)
    del view, array
    d = pool.empty(F32_MIB, torch.float32)
    assert pool.reused == 1 and pool.made == 3 and d.data_ptr() != c.data_ptr()


def test_the_cap_is_never_passed_and_small_requests_are_plain():
    pool = _pool(cap=2 * MIB)
    a = pool.empty(F32_MIB, torch.float32)
    b = pool.empty(F32_MIB, torch.float32)
    c = pool.empty(F32_MIB, torch.float32)  # over the cap: outside the pool
    small = pool.empty((100,), torch.float32)  # under min_bytes: outside the pool
    assert (pool.made, pool.plain, pool.held) == (2, 2, 2 * MIB)
    none = ScratchPool(MIB, min_bytes=0).empty((0, 5), torch.float32)  # empty: outside
    assert none.shape == (0, 5)
    huge = pool.empty((3 * MIB // 4,), torch.float32)  # larger than the cap: outside
    assert pool.plain == 3 and huge.numel() == 3 * MIB // 4
    del a
    d = pool.empty(F32_MIB, torch.float32)
    assert pool.reused == 1 and pool.held == 2 * MIB
    del b, c, d, small


def test_a_miss_replaces_free_storages_instead_of_growing():
    pool = _pool()
    ones = [pool.empty(F32_MIB, torch.float32) for _ in range(3)]
    assert pool.held == 3 * MIB and pool.made == 3
    del ones
    big = pool.empty((2 * MIB // 4,), torch.float32)  # 2 MiB: none fits; 3 MiB were in use
    # at once, so two free 1 MiB storages make room
    assert pool.held == 3 * MIB and pool.made == 4
    again = pool.empty(F32_MIB, torch.float32)  # the 1 MiB storage left
    assert pool.held == 3 * MIB and pool.reused == 1
    del big, again


def test_room_is_made_by_dropping_the_least_recently_used():
    pool = _pool()
    a, b, c = (pool.empty(F32_MIB, torch.float32) for _ in range(3))  # 3 MiB at once
    ptr_a = a.data_ptr()
    del a, b, c
    x = pool.empty(F32_MIB, torch.float32)  # a again: b and c are now the least recent
    assert x.data_ptr() == ptr_a
    del x
    big = pool.empty((2 * MIB // 4,), torch.float32)  # room for 2 MiB: b and c dropped
    assert pool.held == 3 * MIB and pool.made == 4
    y = pool.empty(F32_MIB, torch.float32)
    assert y.data_ptr() == ptr_a and pool.reused == 2
    del big, y


def test_a_small_tensor_does_not_take_a_much_larger_storage():
    pool = _pool()
    large = pool.empty((16 * MIB // 4,), torch.float32)
    ptr = large.data_ptr()
    del large
    small = pool.empty(F32_MIB, torch.float32)  # 16 MiB > 4 x 1 MiB + GRAIN: a new one
    assert small.data_ptr() != ptr and pool.made == 2
    assert pool.held == MIB  # and the 16 MiB storage it replaced is gone
    del small
    mid = pool.empty((4 * MIB // 4,), torch.float32)  # 4 MiB: a new one (under the 16 MiB
    assert pool.made == 3 and pool.held == 5 * MIB  # once in use: the 1 MiB one stays)
    del mid
    quarter = pool.empty((MIB // 4 + 1,), torch.float32)  # just over 1 MiB: the 4 MiB one
    assert pool.reused == 1 and pool.held == 5 * MIB
    del quarter


def test_an_idle_storage_is_kept_for_a_later_tensor_of_its_size():
    # the embedding's storages, idle while the layers run, serve the lm_head job at the end
    pool = ScratchPool(64 * MIB, min_bytes=64 << 10)
    large = pool.empty((3 * MIB // 4,), torch.float32)  # 3 MiB
    small = pool.empty((64 << 10,), torch.float32)  # 256 kB on a 1 MiB storage
    ptr = large.data_ptr()
    assert pool.made == 2 and pool.held == 4 * MIB
    del large, small
    for _ in range(1000):  # served by the 1 MiB storage (3 MiB > 4 x 256 kB + 1 MiB)
        pool.empty((64 << 10,), torch.float32)
    assert pool.held == 4 * MIB and pool.made == 2
    again = pool.empty((3 * MIB // 4,), torch.float32)
    assert again.data_ptr() == ptr and pool.made == 2 and pool.reused == 1001


def test_clear_drops_only_free_storages():
    pool = _pool()
    kept = pool.empty(F32_MIB, torch.float32).fill_(5.0)
    pool.empty(F32_MIB, torch.float32)
    assert pool.held == 2 * MIB
    pool.clear()
    assert pool.held == MIB and bool((kept == 5.0).all())


def test_storages_are_rounded_to_the_grain():
    pool = _pool()
    t = pool.empty((MIB // 4 + 1,), torch.float32)
    assert pool.held == 2 * GRAIN and t.numel() == MIB // 4 + 1


def test_threads_never_share_a_storage():
    pool = _pool(cap=16 * MIB)
    errors: list[str] = []
    start = threading.Barrier(4)

    def work(k: int) -> None:
        start.wait()
        for _ in range(50):
            t = pool.empty(F32_MIB, torch.float32).fill_(float(k))
            torch.cos(torch.arange(2000.0))  # let the others run
            if not bool((t == float(k)).all()):
                errors.append(f"thread {k}: overwritten")
            del t

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == [] and pool.plain == 0 and pool.made + pool.reused == 200


def test_installed_pool_serves_the_module_empty_and_is_cleared():
    assert scratch.current() is None
    plain = scratch.empty(F32_MIB, torch.float32)
    assert plain.shape == F32_MIB
    pool = _pool()
    with scratch.installed(pool) as current:
        assert current is pool and scratch.current() is pool
        with scratch.installed(_pool()) as inner:  # a merge inside a merge: the outer one
            assert inner is pool
        a = scratch.empty(F32_MIB, torch.float32)
        scratch.empty(F32_MIB, torch.float32)
        assert pool.made == 2
        meta = scratch.empty(F32_MIB, torch.float32, "meta")  # not the CPU: not pooled
        assert meta.device.type == "meta" and (pool.made, pool.reused) == (2, 0)
    assert scratch.current() is None
    assert pool.held == MIB  # the free one dropped, the one in use kept
    del a
    with scratch.installed(None) as none:
        assert none is None and scratch.current() is None


def test_without_torchs_use_count_nothing_is_pooled(monkeypatch):
    monkeypatch.setattr(scratch, "POOLABLE", False)
    pool = _pool()
    with scratch.installed(pool) as current:
        assert current is None and scratch.current() is None
        a = scratch.empty(F32_MIB, torch.float32)
        assert a.shape == F32_MIB and pool.made == 0
