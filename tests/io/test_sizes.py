import pytest

from splice.errors import SpliceError
from splice.io import SizeError, parse_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("500MB", 500_000_000),
        ("2GB", 2_000_000_000),
        ("1.5G", 1_500_000_000),
        ("1000000", 1_000_000),
        (1000000, 1_000_000),
        ("5gb", 5_000_000_000),
        ("  2 GB ", 2_000_000_000),
        ("1KiB", 1024),
        ("2GiB", 2 * 1024**3),
        ("0.5MiB", 512 * 1024),
        ("3B", 3),
        ("1T", 10**12),
        ("123456789012345678", 123456789012345678),
    ],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    "text", ["", "GB", "2XB", "-1GB", "1e9", "0", "0.0000001KB", "1,5GB", True]
)
def test_parse_size_errors(text):
    with pytest.raises(SizeError, match="invalid size") as e:
        parse_size(text)
    assert isinstance(e.value, SpliceError) and isinstance(e.value, ValueError)
