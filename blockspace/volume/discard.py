"""Discard: a range of a volume made to read as zeros (NBD TRIM and WRITE_ZEROES), giving
space back to the pool where it can.

The rule (the simplest one that is correct):
- a slab the range covers whole, in a thin volume, is unmapped (`Volume.unmap_slabs` ->
  `Pool.free_slabs`): the map without it is committed before its extents are free, so a
  crash leaves it mapped with its old content or unmapped, never mapped to extents another
  slab was given; it then reads as zeros and a later write allocates afresh;
- the rest of the range in mapped slabs (a partial slab, every slab of a fixed or tiered
  volume, and everything when the client said NO_HOLE) is zeroed through the ordinary write
  path, in chunks: checksums, parity rows and mirror copies stay consistent exactly as for
  any write, and the write-intent log covers a crash half-way. Marking blocks "unwritten"
  instead would save the writes, but every parity row would have to stay consistent with
  "unwritten reads as zeros" on all its columns through a crash; not worth it for the part
  of a slab a discard leaves;
- a slab not mapped already reads as zeros: nothing to do, and nothing scanned.
"""

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

from blockspace.ondisk.metadata import VolumeRecord

ZERO_CHUNK = 1 << 20  # bytes of zeros per volume write
UNMAP_BATCH = 64  # slabs unmapped by one metadata commit (and held locked meanwhile)
ZEROS = memoryview(bytes(ZERO_CHUNK))


class Discardable(Protocol):
    """What a discard needs of a volume (blockspace/volume/volume.py)."""

    @property
    def slab_data_size(self) -> int: ...

    def is_mapped(self, slab: int) -> bool: ...

    async def unmap_slabs(self, slabs: list[int]) -> int: ...

    async def write(self, offset: int, data: bytes | bytearray | memoryview) -> None: ...


class Writable(Protocol):
    async def write(self, offset: int, data: bytes | bytearray | memoryview) -> None: ...


@dataclass(frozen=True)
class DiscardPlan:
    unmap: list[int]  # slabs covered whole, to unmap
    zero: list[tuple[int, int]]  # (volume offset, bytes) to write zeros over, chunked


def zero_chunks(offset: int, length: int) -> Iterator[tuple[int, int]]:
    """(offset, bytes) pieces of at most ZERO_CHUNK, aligned to ZERO_CHUNK after the first
    (so a slab's pieces never straddle it)."""
    position, end = offset, offset + length
    while position < end:
        count = min(end, (position // ZERO_CHUNK + 1) * ZERO_CHUNK) - position
        yield position, count
        position += count


def plan_discard(slab_data_size: int, offset: int, length: int, *, unmap: bool) -> DiscardPlan:
    """What a discard of [offset, offset+length) does: with `unmap`, each slab covered
    whole is unmapped; everything else is zeroed."""
    slabs: list[int] = []
    zero: list[tuple[int, int]] = []
    position, end = offset, offset + length
    while position < end:
        slab, slab_offset = divmod(position, slab_data_size)
        count = min(slab_data_size - slab_offset, end - position)
        if unmap and count == slab_data_size:
            slabs.append(slab)
        else:
            zero.extend(zero_chunks(position, count))
        position += count
    return DiscardPlan(slabs, zero)


def can_unmap(record: VolumeRecord, volumes: Iterable[VolumeRecord]) -> bool:
    """Whole slabs are unmapped in a thin volume that is not a tier of a tiered volume (a
    tier's slabs move with its map; zeroing keeps that simple)."""
    if record.provisioning != "thin" or record.tiers is not None:
        return False
    return not any(parent.tiers is not None and record.name in (parent.tiers.ssd,
                                                                parent.tiers.hdd)
                   for parent in volumes)


async def write_zeros(volume: Writable, offset: int, length: int) -> None:
    """Zeros over the range through the volume's writes, chunk by chunk (for a volume with
    no discard of its own: a tiered volume)."""
    for position, count in zero_chunks(offset, length):
        await volume.write(position, ZEROS[:count])


async def discard_range(volume: Discardable, offset: int, length: int, *, unmap: bool) -> None:
    """Carry out `plan_discard` on the volume. Whether a slab is mapped is asked just before
    each chunk is zeroed: one not mapped reads as zeros already."""
    plan = plan_discard(volume.slab_data_size, offset, length, unmap=unmap)
    for first in range(0, len(plan.unmap), UNMAP_BATCH):
        await volume.unmap_slabs(plan.unmap[first : first + UNMAP_BATCH])
    size = volume.slab_data_size
    for position, count in plan.zero:
        if volume.is_mapped(position // size):
            await volume.write(position, ZEROS[:count])
