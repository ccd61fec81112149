"""Parsing and formatting of byte sizes.

As coreutils reads them: K, M, G, T, P and KiB ... PiB are binary (1K = 1024); KB ... PB
are decimal (1KB = 1000), so "1TB" is the 10^12 bytes a disk vendor means, not 1 TiB.
Printed sizes are binary, with one-letter suffixes (1.5G)."""

import re
from fractions import Fraction

from blockspace.errors import InvalidInput

_POWERS = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4, "P": 5}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(?:([KMGTP])(I?B)?|(B)?)\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'64M', '1.5G', '20GiB', '4096', '1TB' (10^12) -> bytes. InvalidInput on anything else."""
    match = _SIZE_RE.match(str(text))
    if not match:
        raise InvalidInput(f"invalid size {text!r} (expected e.g. 512M, 20G, 1T, 1TB)")
    number, letter, tail, _bytes = match.groups()
    power = _POWERS[(letter or "").upper()]
    base = 1000 if tail is not None and tail.upper() == "B" else 1024
    value = Fraction(number) * base**power  # exact: no float rounding
    if value.denominator != 1:
        raise InvalidInput(f"invalid size {text!r}: not a whole number of bytes")
    return int(value)


def format_size(n: int) -> str:
    """Bytes -> a short human string: 1536 -> '1.5K', 64 MiB -> '64M'."""
    value = float(n)
    for suffix in ("B", "K", "M", "G", "T"):
        if abs(value) < 1024 or suffix == "T":
            if suffix == "B":
                return f"{int(value)}B"
            text = f"{value:.1f}".rstrip("0").rstrip(".")
            return f"{text}{suffix}"
        value /= 1024
    raise AssertionError("unreachable")
