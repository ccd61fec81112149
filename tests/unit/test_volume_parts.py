"""The pure parts of the volume: a request's pieces in and out of its buffer, lock keys and
intent regions of a byte range, slab ranges, a parity row's fragment positions, and the
merge of mirror copies (which blocks an unreadable copy gets back, what a torn block
becomes) — each against a byte-by-byte model."""

import random

from hypothesis import given
from hypothesis import strategies as st

from blockspace.geometry.layouts import LayoutSpec, code_position, segments, split
from blockspace.ondisk.checksums import (
    CSUM_BLOCK,
    ENTRY_SIZE,
    bad_blocks,
    choose_blocks,
    entries_for,
    entry_at,
    entry_seq,
)
from blockspace.volume.mirror import Merge
from blockspace.volume.parity import RowRead, fragment_index
from blockspace.volume.pieces import align_down, align_up, gather, scatter
from blockspace.volume.region_resync import regions_touched
from blockspace.volume.row_locks import column_rows, slab_rows
from blockspace.volume.volume import slab_ranges

from .test_layouts import where

SPECS = [
    LayoutSpec("simple", 1, interleave=4096),
    LayoutSpec("simple", 4, interleave=8192),
    LayoutSpec("mirror", 1, copies=2, interleave=4096),
    LayoutSpec("mirror", 2, copies=2, interleave=4096),
    LayoutSpec("parity", 3, parity=1, interleave=4096),
    LayoutSpec("parity", 2, parity=2, interleave=16384),
]


@given(spec=st.sampled_from(SPECS), offset=st.integers(0, 100_000),
       length=st.integers(1, 60_000))
def test_gather_takes_a_piece_in_disk_order_and_scatter_puts_it_back(
    spec: LayoutSpec, offset: int, length: int
) -> None:
    request = random.Random(offset * 7 + length).randbytes(length)
    back = bytearray(length)
    for piece in split(spec, offset, length):
        payload = bytes(gather(spec, memoryview(request), piece))
        assert len(payload) == piece.length
        # Byte `at` of the payload is extent byte `column_offset + at` of the piece's column.
        for buf, at, count in segments(spec, piece):
            assert payload[at : at + count] == request[buf : buf + count]
            assert where(spec, offset + buf) == (piece.column, piece.column_offset + at)
        skip = 3  # scatter reads from `skip` bytes into what the disk returned
        scatter(spec, back, piece, b"\0" * skip + payload, skip)
    assert bytes(back) == request


def test_alignment_to_whole_blocks() -> None:
    assert (align_down(0), align_up(0)) == (0, 0)
    assert (align_down(4095), align_up(4095)) == (0, 4096)
    assert (align_down(4096), align_up(4096)) == (4096, 4096)
    assert (align_down(4097), align_up(4097)) == (4096, 8192)


@given(spec=st.sampled_from(SPECS), start=st.integers(0, 200_000),
       length=st.integers(1, 100_000), slab=st.integers(0, 3))
def test_lock_keys_are_the_rows_the_range_touches(
    spec: LayoutSpec, start: int, length: int, slab: int
) -> None:
    end = start + length
    row_bytes = spec.interleave * spec.columns
    touched = sorted({position // row_bytes for position in range(start, end, 509)}
                     | {(end - 1) // row_bytes})
    assert slab_rows(spec, slab, start, end) == [(slab, row) for row in touched]
    in_extent = sorted({position // spec.interleave for position in range(start, end, 509)}
                       | {(end - 1) // spec.interleave})
    assert column_rows(spec, slab, start, end) == [(slab, row) for row in in_extent]


@given(spec=st.sampled_from(SPECS), start=st.integers(0, 400_000),
       length=st.integers(1, 200_000), size=st.sampled_from([16384, 65536]))
def test_intent_regions_are_those_the_rows_of_the_range_lie_in(
    spec: LayoutSpec, start: int, length: int, size: int
) -> None:
    size = max(size, spec.interleave)  # a region is a whole number of rows
    end = start + length
    row_bytes = spec.interleave * spec.columns
    rows = range(start // row_bytes, (end - 1) // row_bytes + 1)
    # A row of the slab's data is one interleave unit at the same offset in each extent.
    assert regions_touched(spec, size, 0, start, end) == {
        row * spec.interleave // size for row in rows}


@given(slab_size=st.sampled_from([4096, 65536, 3 * 65536]), offset=st.integers(0, 10**6),
       length=st.integers(0, 10**6))
def test_slab_ranges_cut_a_request_at_slab_boundaries(
    slab_size: int, offset: int, length: int
) -> None:
    ranges = list(slab_ranges(slab_size, offset, length))
    assert sum(count for *_, count in ranges) == length
    at = 0
    for slab, slab_offset, request_offset, count in ranges:
        assert request_offset == at
        assert count > 0
        assert slab * slab_size + slab_offset == offset + at
        assert slab_offset + count <= slab_size
        at += count


def test_fragment_index_is_the_inverse_of_code_position() -> None:
    for spec in (s for s in SPECS if s.kind == "parity"):
        for row in range(2 * spec.width):
            positions = [code_position(spec, row, index) for index in range(spec.width)]
            assert sorted(positions) == list(range(spec.width))
            for index, position in enumerate(positions):
                assert fragment_index(spec, row, position) == index


def test_row_reads_add_up() -> None:
    first = RowRead({0: (b"a", b"e")}, {0: b"a"}, [])
    first.add(RowRead({1: (b"b", b"f"), 2: (b"c", b"g")}, {2: b"c"}, [1]))
    assert (sorted(first.raw), sorted(first.good), first.corrupt) == ([0, 1, 2], [0, 2], [1])


def copies_of(blocks: list[bytes], seq: int) -> tuple[bytes, bytes]:
    data = b"".join(blocks)
    return data, entries_for(data, seq)


def test_an_unreadable_copy_gets_back_every_block_that_has_a_good_copy() -> None:
    good = [bytes([i]) * CSUM_BLOCK for i in range(4)]
    data, entries = copies_of(good, 7)
    rotten = bytearray(data)
    rotten[2 * CSUM_BLOCK] ^= 1  # block 2 rots on the only readable copy
    copies = {0: (bytes(rotten), entries)}
    merge = Merge(0, copies, [1], choose_blocks(copies))
    assert merge.choice.unrecoverable == [2]
    merge.rewrite_unreadable()
    assert merge.choice.repairs[1] == [0, 1, 3]  # not the block nobody can vouch for


def test_a_torn_block_keeps_the_first_copys_data_with_a_matching_checksum_everywhere() -> None:
    old = [b"o" * CSUM_BLOCK] * 3
    new = [b"n" * CSUM_BLOCK] * 3
    first_data, first_entries = copies_of(old, 5)
    second_data, second_entries = copies_of(new, 9)
    # Block 1 torn on both copies: data of one write, entry of the other.
    torn_first = first_entries[:ENTRY_SIZE] + second_entries[ENTRY_SIZE:2 * ENTRY_SIZE] \
        + first_entries[2 * ENTRY_SIZE:]
    torn_second = second_entries[:ENTRY_SIZE] + first_entries[ENTRY_SIZE:2 * ENTRY_SIZE] \
        + second_entries[2 * ENTRY_SIZE:]
    copies = {0: (first_data, torn_first), 1: (second_data, torn_second)}
    merge = Merge(0, copies, [], choose_blocks(copies))
    assert merge.choice.unrecoverable == [1]
    merge.keep_torn_blocks()
    choice = merge.choice
    assert choice.data[CSUM_BLOCK : 2 * CSUM_BLOCK] == old[1]  # the first copy's data
    assert not bad_blocks(bytes(choice.data), bytes(choice.entries))
    assert entry_seq(entry_at(bytes(choice.entries), 1)) == 9  # the newer write's number
    assert all(1 in choice.repairs[position] for position in copies)
