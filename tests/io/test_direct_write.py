"""DirectFile: whole pages past the page cache, partial pages through it, same bytes."""

from __future__ import annotations

import errno
import itertools
import os
import random
import threading
from pathlib import Path

import pytest

from splice.errors import CheckpointError
from splice.io import direct_write
from splice.io.direct_write import ALIGN, MIN_DIRECT, DirectFile


def _blank(path: Path, size: int) -> Path:
    path.write_bytes(b"")
    os.truncate(path, size)
    return path


def _spans(size: int, pieces: int, seed: int) -> list[tuple[int, int]]:
    """`pieces` contiguous spans covering [0, size) at unaligned cut points."""
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, size), pieces - 1))
    edges = [0, *cuts, size]
    return list(itertools.pairwise(edges))


@pytest.fixture
def spy_pwrite(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int, int]]:
    """Every os.pwrite as (fd, offset, length)."""
    calls: list[tuple[int, int, int]] = []
    real = os.pwrite
    lock = threading.Lock()

    def pwrite(fd: int, data: memoryview, offset: int) -> int:
        with lock:
            calls.append((fd, offset, len(data)))
        return real(fd, data, offset)

    monkeypatch.setattr(direct_write.os, "pwrite", pwrite)
    return calls


def _pages(offset: int, length: int) -> set[int]:
    return set(range(offset // ALIGN, (offset + length - 1) // ALIGN + 1)) if length else set()


def test_bytes_land_exactly_and_pages_are_never_written_both_ways(
    tmp_path: Path, spy_pwrite: list[tuple[int, int, int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(direct_write, "BOUNCE_BYTES", 3 * ALIGN * 64)  # several bounce rounds
    size = 3 * MIN_DIRECT + 12_345
    payload = random.Random(0).randbytes(size)
    path = _blank(tmp_path / "out.bin", size)
    spans = _spans(size, 5, seed=1)
    file = DirectFile(path)
    if not file.is_direct:
        file.close()
        pytest.skip("this file system refuses O_DIRECT")
    view = memoryview(payload)
    threads = [threading.Thread(target=file.pwrite, args=(view[a:b], a)) for a, b in spans]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    direct_fd, plain_fd = file.direct_fd, file.fd
    file.fsync()
    file.close()
    assert path.read_bytes() == payload

    direct = [(o, n) for fd, o, n in spy_pwrite if fd == direct_fd]
    plain = [(o, n) for fd, o, n in spy_pwrite if fd == plain_fd]
    assert direct, "no span used the O_DIRECT descriptor"
    assert all(o % ALIGN == 0 and n % ALIGN == 0 for o, n in direct)
    direct_pages = set().union(*(_pages(o, n) for o, n in direct))
    plain_pages = set().union(*(_pages(o, n) for o, n in plain))
    assert not direct_pages & plain_pages
    assert direct_pages | plain_pages == _pages(0, size)


def test_small_writes_go_through_the_cache(
    tmp_path: Path, spy_pwrite: list[tuple[int, int, int]]
) -> None:
    size = MIN_DIRECT  # at an unaligned offset its whole-page part is below MIN_DIRECT
    path = _blank(tmp_path / "small.bin", size + 100)
    payload = bytes(range(256)) * (size // 256)
    file = DirectFile(path)
    file.pwrite(memoryview(payload), 100)
    plain_fd, direct_fd = file.fd, file.direct_fd
    file.close()
    assert path.read_bytes()[100:] == payload
    assert {fd for fd, _, _ in spy_pwrite} == {plain_fd}
    assert direct_fd != plain_fd


def test_refused_direct_write_falls_back_with_the_same_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    size = 4 * MIN_DIRECT + 777
    payload = random.Random(2).randbytes(size)
    path = _blank(tmp_path / "refused.bin", size + 10)
    file = DirectFile(path)
    if file.direct_fd < 0:
        file.direct_fd = os.open(path, os.O_WRONLY)  # a stand-in the fake refusal applies to
    real = os.pwrite
    refused = []

    def pwrite(fd: int, data: memoryview, offset: int) -> int:
        if fd == file.direct_fd and offset >= 2 * MIN_DIRECT:
            refused.append(offset)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, data, offset)

    monkeypatch.setattr(direct_write, "BOUNCE_BYTES", MIN_DIRECT)
    monkeypatch.setattr(direct_write.os, "pwrite", pwrite)
    file.pwrite(memoryview(payload), 10)
    assert refused and not file.is_direct
    file.pwrite(memoryview(payload[:5]), 0)  # later writes: through the cache only
    file.close()
    data = path.read_bytes()
    assert data[10:] == payload and data[:5] == payload[:5]


def test_other_write_errors_are_checkpoint_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _blank(tmp_path / "full.bin", 4 * MIN_DIRECT)
    file = DirectFile(path)

    def pwrite(fd: int, data: memoryview, offset: int) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(direct_write.os, "pwrite", pwrite)
    with pytest.raises(CheckpointError, match=r"full\.bin: write failed: No space left"):
        file.pwrite(memoryview(bytes(3 * MIN_DIRECT)), 0)
    file.close()
    file.close()  # idempotent


def test_without_o_direct_everything_goes_through_the_cache(tmp_path: Path) -> None:
    payload = random.Random(3).randbytes(2 * MIN_DIRECT + 5)
    path = _blank(tmp_path / "plain.bin", len(payload))
    file = DirectFile(path, direct=False)
    assert not file.is_direct and file.direct_fd == -1
    file.pwrite(memoryview(payload), 0)
    file.close()
    assert path.read_bytes() == payload


def test_missing_file_is_a_checkpoint_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="cannot open for writing"):
        DirectFile(tmp_path / "absent.bin")
