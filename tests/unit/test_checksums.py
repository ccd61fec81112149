"""The checksum helpers on the hot path against plain per-entry reference versions."""

import itertools
import struct

import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from blockspace.ondisk.checksums import (
    CSUM_BLOCK,
    ENTRY_SIZE,
    bad_blocks,
    block_ok,
    entries_for,
    newer_elsewhere,
)

ENTRY = struct.Struct("<QQ")


def reference_entries(data: bytes, seq: int) -> bytes:
    return b"".join(
        ENTRY.pack(xxhash.xxh3_64_intdigest(data[i : i + CSUM_BLOCK]) or 1, seq)
        for i in range(0, len(data), CSUM_BLOCK)
    )


def reference_bad(data: bytes, entries: bytes) -> list[int]:
    return [
        i for i in range(len(data) // CSUM_BLOCK)
        if not block_ok(data[i * CSUM_BLOCK : (i + 1) * CSUM_BLOCK],
                        entries[i * ENTRY_SIZE : (i + 1) * ENTRY_SIZE])
    ]


def reference_newer(mine: bytes, others: list[bytes]) -> bool:
    seqs = [ENTRY.unpack_from(mine, i)[1] for i in range(0, len(mine), ENTRY_SIZE)]
    return any(
        ENTRY.unpack_from(other, i * ENTRY_SIZE)[1] > seq
        for other in others for i, seq in enumerate(seqs)
    )


blocks = st.lists(
    st.sampled_from([bytes(CSUM_BLOCK), b"\1" * CSUM_BLOCK, b"ab" * (CSUM_BLOCK // 2)]),
    min_size=1, max_size=8,
).map(b"".join)


@given(data=blocks, seq=st.integers(0, (1 << 64) - 1))
def test_entries_match_the_reference(data: bytes, seq: int) -> None:
    assert entries_for(data, seq) == reference_entries(data, seq)
    assert entries_for(memoryview(bytearray(data)), seq) == reference_entries(data, seq)


@settings(max_examples=200)
@given(data=blocks, seq=st.integers(0, 5), flips=st.lists(st.integers(0, 1 << 20)),
       unwritten=st.lists(st.integers(0, 7)))
def test_bad_blocks_match_the_reference(
    data: bytes, seq: int, flips: list[int], unwritten: list[int]
) -> None:
    entries = bytearray(entries_for(data, seq))
    for index in unwritten:  # some entries say "never written"
        if index < len(data) // CSUM_BLOCK:
            entries[index * ENTRY_SIZE : (index + 1) * ENTRY_SIZE] = bytes(ENTRY_SIZE)
    rotten = bytearray(data)
    for flip in flips:
        rotten[flip % len(rotten)] ^= 0x40
    expected = reference_bad(bytes(rotten), bytes(entries))
    assert bad_blocks(bytes(rotten), bytes(entries)) == expected
    # The same blocks read scattered into several buffers (cut at whole blocks) check alike.
    view, count = memoryview(rotten), len(rotten) // CSUM_BLOCK
    cuts = sorted({0, count} | {flip % (count + 1) for flip in flips})
    parts = [view[a * CSUM_BLOCK : b * CSUM_BLOCK] for a, b in itertools.pairwise(cuts)]
    assert bad_blocks(parts, bytes(entries)) == expected


def test_bad_blocks_refuses_buffers_that_are_not_whole_blocks() -> None:
    data = memoryview(bytes(2 * CSUM_BLOCK))
    entries = entries_for(bytes(data))
    with pytest.raises(ValueError, match="whole 4K blocks"):
        bad_blocks([data[:100], data[100:]], entries)
    with pytest.raises(ValueError, match="entry count"):
        bad_blocks(data, entries[:ENTRY_SIZE])


@given(seqs=st.lists(st.lists(st.integers(0, 9), min_size=3, max_size=3), min_size=1, max_size=4))
def test_newer_elsewhere_matches_the_reference(seqs: list[list[int]]) -> None:
    copies = [b"".join(ENTRY.pack(7, s) for s in row) for row in seqs]
    mine, others = copies[0], copies[1:]
    assert newer_elsewhere(mine, others) == reference_newer(mine, others)
