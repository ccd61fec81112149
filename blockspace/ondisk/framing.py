"""What the framed on-disk records (the disk label, the metadata slots) share: a format
version checked the same way, and a body that must be strict UTF-8 JSON (no duplicate keys,
no NaN): a crafted record is refused with one line, never trusted."""

import json
from typing import Any

from blockspace.errors import FormatError


def check_format_version(version: int, supported: int, what: str) -> None:
    """Refuse a record of another format version, saying whether it is newer."""
    if version > supported:
        raise FormatError(
            f"{what} format version {version} is newer than this Blockspace supports "
            f"({supported})"
        )
    if version != supported:
        raise FormatError(f"{what} format version {version} is not supported")


def decode_json_body(body: bytes, what: str) -> Any:
    """A record's body as strict JSON; FormatError naming `what` otherwise."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise FormatError(f"{what} is not valid UTF-8") from None
    try:
        return loads_strict(text)
    except ValueError as exc:
        raise FormatError(f"{what} is not valid JSON: {str(exc)[:80]}") from None


def reject_constant(name: str) -> Any:
    """`parse_constant` hook for json.loads: NaN and Infinity are not JSON."""
    raise ValueError(f"{name} is not allowed")


def no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """`object_pairs_hook` for json.loads: a repeated key is a crafted document."""
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def loads_strict(text: str) -> Any:
    """json.loads that refuses duplicate keys and NaN/Infinity; all failures are ValueError."""
    try:
        return json.loads(text, object_pairs_hook=no_duplicate_keys, parse_constant=reject_constant)
    except RecursionError:
        raise ValueError("nested too deeply") from None
