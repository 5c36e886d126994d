"""Human byte sizes ("500MB", "2GB", "1.5G", "1000000") to integers."""

from __future__ import annotations

import re
from decimal import Decimal

from splice.errors import SpliceError

_UNITS: dict[str, int] = {
    "": 1,
    "B": 1,
    "K": 10**3,
    "KB": 10**3,
    "M": 10**6,
    "MB": 10**6,
    "G": 10**9,
    "GB": 10**9,
    "T": 10**12,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}

_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*$")


class SizeError(SpliceError, ValueError):
    """A size string that cannot be parsed (also a ValueError, for validators)."""


def parse_size(text: str | int) -> int:
    """Parse a byte size; units are decimal like Hugging Face's `max_shard_size`.

    K/KB = 1e3, M/MB = 1e6, G/GB = 1e9, T/TB = 1e12 bytes; KiB/MiB/GiB/TiB are the binary
    ones (1024**n). Units are case-insensitive, a bare number is bytes, fractions are allowed
    ("1.5G") and rounded to the nearest byte. The result must be at least one byte.
    """
    if isinstance(text, bool):
        raise SizeError(f"invalid size {text!r}: expected a number of bytes or a string like 2GB")
    if isinstance(text, int):
        if text < 1:
            raise SizeError(f"invalid size {text}: must be at least 1 byte")
        return text
    if not isinstance(text, str):
        raise SizeError(f"invalid size {text!r}: expected a number of bytes or a string like 2GB")
    m = _SIZE.match(text)
    unit = m.group(2).upper() if m else ""
    if not m or unit not in _UNITS:
        raise SizeError(
            f"invalid size {text!r}: expected a number with an optional unit "
            "(B, KB, MB, GB, TB, KiB, MiB, GiB, TiB), e.g. 500MB, 1.5GB or 1000000"
        )
    value = round(Decimal(m.group(1)) * _UNITS[unit])
    if value < 1:
        raise SizeError(f"invalid size {text!r}: must be at least 1 byte")
    return value
