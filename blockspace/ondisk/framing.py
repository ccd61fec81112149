"""What the framed on-disk records (the disk label, the lease, the metadata slots) share: a
format version checked the same way, and a body that must be strict UTF-8 JSON (no duplicate
keys, no NaN): a crafted record is refused with one line, never trusted. The label and the
lease are also framed alike: one block of
`magic | u32 version | u32 body length | u64 xxh3_64(body) | body | zeros`."""

import json
import struct
from typing import Any

import xxhash

from blockspace.errors import FormatError

BLOCK_HEADER = struct.Struct("<8sIIQ")  # 24 bytes, little-endian


def frame_block(magic: bytes, version: int, body: bytes, size: int) -> bytes:
    """One framed block of `size` bytes holding `body` (which the caller made fit)."""
    header = BLOCK_HEADER.pack(magic, version, len(body), xxhash.xxh3_64_intdigest(body))
    return (header + body).ljust(size, b"\0")


def unframe_block(raw: bytes, magic: bytes, version: int, what: str,
                  version_what: str | None = None) -> bytes | None:
    """The body of one framed block, None if it does not start with `magic`; FormatError
    naming `what` if it does but its version, length, checksum or padding is wrong."""
    found, found_version, length, checksum = BLOCK_HEADER.unpack_from(raw)
    if found != magic:
        return None
    check_format_version(found_version, version, version_what or what)
    start = BLOCK_HEADER.size
    if not 2 <= length <= len(raw) - start:
        raise FormatError(f"{what} body length {length} out of bounds")
    body = raw[start : start + length]
    if xxhash.xxh3_64_intdigest(body) != checksum:
        raise FormatError(f"{what} checksum mismatch")
    if raw[start + length :].strip(b"\0"):
        raise FormatError(f"{what} padding is not zero")
    return body


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
