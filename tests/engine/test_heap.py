"""`splice.engine.heap`: glibc's mmap threshold fixed for a merge."""

from __future__ import annotations

import platform

from splice.engine.heap import release_large_buffers


def test_the_threshold_is_set_under_glibc():
    took = release_large_buffers()
    assert took is (platform.libc_ver()[0] == "glibc")
