"""Block checksums: one 16-byte entry per 4 KiB block, kept in each extent's checksum area.

Entry: u64 xxh3_64 of the block | u64 reserved (zero). An all-zero entry means "never
written since the extent was allocated", and such a block must read as zeros; a real hash
is never zero (it is nudged to 1), so the two cannot be confused. Pure code.
"""

import struct
from collections.abc import Iterator

import xxhash

CSUM_BLOCK = 4096
ENTRY_SIZE = 16
UNWRITTEN = bytes(ENTRY_SIZE)
_ENTRY = struct.Struct("<QQ")
_ZERO_BLOCK = bytes(CSUM_BLOCK)


def block_hash(block: bytes | bytearray | memoryview) -> int:
    value = xxhash.xxh3_64_intdigest(block)
    return value or 1


def entries_for(data: bytes | bytearray | memoryview) -> bytes:
    """Checksum entries of `data`, a whole number of blocks."""
    if len(data) % CSUM_BLOCK:
        raise ValueError(f"checksummed data must be whole 4K blocks, not {len(data)} bytes")
    view = memoryview(data)
    return b"".join(
        _ENTRY.pack(block_hash(view[i : i + CSUM_BLOCK]), 0)
        for i in range(0, len(view), CSUM_BLOCK)
    )


def block_ok(block: bytes | bytearray | memoryview, entry: bytes | memoryview) -> bool:
    if bytes(entry) == UNWRITTEN:
        return bytes(block) == _ZERO_BLOCK
    value, _ = _ENTRY.unpack(entry)
    return block_hash(block) == value


def bad_blocks(data: bytes | bytearray | memoryview, entries: bytes | bytearray) -> list[int]:
    """Indices of the blocks of `data` that do not match their entries."""
    view = memoryview(data)
    return [
        index
        for index, (block, entry) in enumerate(_pairs(view, memoryview(entries)))
        if not block_ok(block, entry)
    ]


def _pairs(data: memoryview, entries: memoryview) -> Iterator[tuple[memoryview, memoryview]]:
    count = len(data) // CSUM_BLOCK
    if len(entries) != count * ENTRY_SIZE:
        raise ValueError("entry count does not match the block count")
    for index in range(count):
        yield (
            data[index * CSUM_BLOCK : (index + 1) * CSUM_BLOCK],
            entries[index * ENTRY_SIZE : (index + 1) * ENTRY_SIZE],
        )
