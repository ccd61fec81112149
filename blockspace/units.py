"""Parsing and formatting of byte sizes (binary units: 1K = 1024)."""

import re
from fractions import Fraction

from blockspace.errors import InvalidInput

_SUFFIXES = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTP]?)(?:I?B)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'64M', '1.5G', '20GiB', '4096' -> bytes. Raises InvalidInput on anything else."""
    match = _SIZE_RE.match(str(text))
    if not match:
        raise InvalidInput(f"invalid size {text!r} (expected e.g. 512M, 20G, 1T)")
    number, suffix = match.groups()
    value = Fraction(number) * _SUFFIXES[suffix.upper()]  # exact: no float rounding
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
