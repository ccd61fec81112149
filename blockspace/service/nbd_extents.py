"""Which parts of a byte range of an export are allocated, without any I/O: the holes of a
thin volume (its slabs not mapped, which read as zeros) for the OFFSET_HOLE chunks of a
structured NBD read and for NBD_CMD_BLOCK_STATUS in the `base:allocation` context.

A slab's mapping is asked once, just before the reply is made: a slab unmapped then reads as
zeros then, which is all a hole claims (requests in flight together are not ordered)."""

from collections.abc import Callable
from typing import NamedTuple, Protocol, runtime_checkable

from blockspace.service import nbd_protocol as wire

MAX_EXTENTS = 1024  # descriptors in one BLOCK_STATUS reply (the spec lets a server send fewer)


@runtime_checkable
class AllocationMap(Protocol):
    """What an export needs to report holes: a plain `Volume` (a tiered one has none, and
    reads as allocated everywhere, which the spec allows: 'or could not determine')."""

    @property
    def slab_data_size(self) -> int: ...

    def is_mapped(self, slab: int) -> bool: ...


class Segment(NamedTuple):
    """A run of the range all mapped or all not (a tuple: one or more per read)."""

    offset: int
    length: int
    mapped: bool


def segments(slab_data_size: int, offset: int, length: int,
             is_mapped: Callable[[int], bool]) -> list[Segment]:
    """[offset, offset+length) cut where a run of mapped slabs meets a run of unmapped ones."""
    first = offset // slab_data_size
    if length and (offset + length - 1) // slab_data_size == first:  # most reads: one slab
        return [Segment(offset, length, is_mapped(first))]
    out: list[Segment] = []
    position, end = offset, offset + length
    while position < end:
        slab, slab_offset = divmod(position, slab_data_size)
        count = min(slab_data_size - slab_offset, end - position)
        mapped = is_mapped(slab)
        if out and out[-1].mapped == mapped:
            last = out[-1]
            out[-1] = Segment(last.offset, last.length + count, mapped)
        else:
            out.append(Segment(position, count, mapped))
        position += count
    return out


def all_data(offset: int, length: int) -> list[Segment]:
    """The segments of an export that cannot tell its holes."""
    return [Segment(offset, length, True)] if length else []


def allocation_extents(parts: list[Segment], *, one: bool = False) -> list[tuple[int, int]]:
    """(length, base:allocation flags) per segment, for NBD_REPLY_TYPE_BLOCK_STATUS: a hole
    is HOLE|ZERO, allocated space 0. At most one with `one` (NBD_CMD_FLAG_REQ_ONE), at most
    MAX_EXTENTS otherwise; the lengths never add up past the request's."""
    limit = 1 if one else MAX_EXTENTS
    return [(part.length, 0 if part.mapped else wire.STATE_HOLE | wire.STATE_ZERO)
            for part in parts[:limit]]
