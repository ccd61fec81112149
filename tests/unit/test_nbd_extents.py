"""The allocation of a byte range (blockspace/service/nbd_extents.py): segments of mapped and
unmapped slabs, and the base:allocation extents made of them."""

from hypothesis import given
from hypothesis import strategies as st

from blockspace.service import nbd_protocol as wire
from blockspace.service.nbd_extents import (
    MAX_EXTENTS,
    Segment,
    all_data,
    allocation_extents,
    segments,
)

SLAB = 1 << 20
HOLE = wire.STATE_HOLE | wire.STATE_ZERO


def test_runs_of_slabs_are_merged_and_clipped_to_the_range() -> None:
    mapped = {2, 3, 5}
    assert segments(SLAB, 100, 6 * SLAB - 200, mapped.__contains__) == [
        Segment(100, 2 * SLAB - 100, False), Segment(2 * SLAB, 2 * SLAB, True),
        Segment(4 * SLAB, SLAB, False), Segment(5 * SLAB, SLAB - 100, True)]
    assert segments(SLAB, SLAB + 5, 10, mapped.__contains__) == [Segment(SLAB + 5, 10, False)]
    assert segments(SLAB, 0, 0, mapped.__contains__) == []


def test_an_export_without_a_map_is_all_data() -> None:
    assert all_data(7, 9) == [Segment(7, 9, True)]
    assert all_data(7, 0) == []


def test_extents_mark_holes_as_hole_and_zero() -> None:
    parts = [Segment(0, SLAB, False), Segment(SLAB, 2 * SLAB, True)]
    assert allocation_extents(parts) == [(SLAB, HOLE), (2 * SLAB, 0)]
    assert allocation_extents(parts, one=True) == [(SLAB, HOLE)]


def test_extents_are_capped() -> None:
    parts = [Segment(i, 1, bool(i % 2)) for i in range(MAX_EXTENTS + 10)]
    assert len(allocation_extents(parts)) == MAX_EXTENTS


@given(slab=st.integers(1, 64), offset=st.integers(0, 1000), length=st.integers(0, 1000),
       mapped=st.frozensets(st.integers(0, 2000)))
def test_segments_cover_the_range_once_and_alternate(slab: int, offset: int, length: int,
                                                     mapped: frozenset[int]) -> None:
    parts = segments(slab, offset, length, mapped.__contains__)
    position = offset
    for index, part in enumerate(parts):
        assert part.offset == position
        assert part.length > 0
        if index:
            assert part.mapped != parts[index - 1].mapped
        for byte in (part.offset, part.offset + part.length - 1):
            assert (byte // slab in mapped) == part.mapped
        position += part.length
    assert position == offset + length
    assert sum(n for n, _ in allocation_extents(parts)) <= length
