"""Size parsing as coreutils reads sizes: one-letter and IEC suffixes are binary, SI ones
(KB, MB, GB, TB, PB) decimal; anything else is refused, never guessed."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blockspace.errors import InvalidInput
from blockspace.units import format_size, parse_size

KIB, MIB, GIB, TIB = 1 << 10, 1 << 20, 1 << 30, 1 << 40


@pytest.mark.parametrize(("text", "size"), [
    ("4096", 4096), ("4096B", 4096), ("4096b", 4096),
    ("64K", 64 * KIB), ("64KiB", 64 * KIB), ("64k", 64 * KIB),
    ("1.5G", 3 * GIB // 2), ("20GiB", 20 * GIB), ("1T", TIB), ("1 tib", TIB),
    ("1KB", 1000), ("1MB", 10**6), ("20GB", 20 * 10**9), ("1TB", 10**12), ("1tb", 10**12),
    ("2PB", 2 * 10**15), ("1.5KB", 1500),
])
def test_binary_and_decimal_suffixes(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", [
    "", "G", "-1G", "1X", "1GG", "1 G B", "1iB", "1.2.3M", "1e9", "0x10", "1.1B", "1.0000001K",
])
def test_anything_else_is_refused(text: str) -> None:
    with pytest.raises(InvalidInput, match="invalid size"):
        parse_size(text)


@given(st.integers(min_value=0, max_value=1 << 60))
def test_plain_byte_counts_round_trip(size: int) -> None:
    assert parse_size(str(size)) == size


@pytest.mark.parametrize(("size", "text"), [
    (0, "0B"), (1023, "1023B"), (1536, "1.5K"), (64 * MIB, "64M"), (5 * TIB, "5T"),
])
def test_format_size(size: int, text: str) -> None:
    assert format_size(size) == text
    assert parse_size(text) == size
