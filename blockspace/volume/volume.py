"""A volume: byte offsets -> slabs -> layout -> concurrent, checksummed device I/O.

Requests are split per slab, then per row and data column by `layouts.split`; the pieces
of one request run concurrently. Every extent read is verified block by block against its
checksum entries; a bad or unreadable copy is served from another copy or rebuilt from
parity, and rewritten in place (self-heal). Writes hold the locks of the rows they touch,
so a parity read-modify-write, a partial-block write, a heal or two mirror writes to one
row never interleave.

The parts, one module each:
- `cached_reads.py`: a read served at once from memory, with no await (the hot path);
- `mirror.py`, `parity.py`: what depends on the redundancy kind (`redundancy.Redundancy`:
  the I/O path asks, never branches on the kind);
- `extent_io.py`: verified, retried, time-bounded whole-block I/O on extents;
- `row_locks.py`: the row locks; `region_resync.py`: the regions an unclean stop left
  dirty, resynced before any I/O touches them.
"""

from collections.abc import Iterator
from dataclasses import dataclass

import trio

from blockspace.errors import HostSpaceError, InvalidInput, SlabUnmapped
from blockspace.geometry.erasure import ErasureCodec
from blockspace.geometry.layouts import LayoutSpec, Piece, split
from blockspace.ondisk.metadata import VolumeRecord
from blockspace.pool.intent import volume_key
from blockspace.pool.pool import Pool
from blockspace.volume.cached_reads import CachedReads
from blockspace.volume.concurrency import bind, run_all
from blockspace.volume.discard import can_unmap, discard_range
from blockspace.volume.extent_io import ExtentIO, Extents
from blockspace.volume.mirror import Mirror
from blockspace.volume.parity import Parity
from blockspace.volume.pieces import BLOCK, align_down, align_up, scatter
from blockspace.volume.redundancy import Counters, Redundancy
from blockspace.volume.region_resync import RegionResync
from blockspace.volume.row_locks import RowLocks, column_rows, slab_rows


@dataclass(frozen=True)
class VolumeStats:
    reads: int
    writes: int
    bytes_read: int
    bytes_written: int
    degraded_reads: int
    healed_blocks: int
    allocated_slabs: int


def slab_ranges(
    slab_data_size: int, offset: int, length: int
) -> Iterator[tuple[int, int, int, int]]:
    """(slab index, offset in slab, offset in request, byte count) per slab a request of
    `length` bytes at volume offset `offset` touches."""
    position, end = offset, offset + length
    while position < end:
        slab, slab_offset = divmod(position, slab_data_size)
        count = min(slab_data_size - slab_offset, end - position)
        yield slab, slab_offset, position - offset, count
        position += count


def redundancy_for(
    spec: LayoutSpec, record: VolumeRecord, io: ExtentIO, locks: RowLocks,
    cached: CachedReads, counters: Counters,
) -> Redundancy:
    """The operations of the volume's redundancy kind."""
    if spec.kind == "parity":
        codec = ErasureCodec(spec.columns, spec.parity, record.ec_type)
        return Parity(io, spec, locks, cached, counters, codec)
    return Mirror(io, spec, locks, cached, counters)


class Volume:
    def __init__(self, pool: Pool, record: VolumeRecord) -> None:
        self.pool = pool
        self.record = record
        self.spec = LayoutSpec.from_dict(record.layout)
        self.slab_data_size = self.spec.slab_data_size(pool.slab_size)
        self.key = volume_key(record.uuid)
        self.row_locks = RowLocks()
        self.io = ExtentIO(pool, record)
        self.cached = CachedReads(self.io, self.spec)
        self.counters = Counters()
        self.redundancy = redundancy_for(self.spec, record, self.io, self.row_locks,
                                         self.cached, self.counters)
        self.region_resync = RegionResync(self.io, self.key, self.spec, self.row_locks,
                                          self.redundancy)
        self._dirty = self.region_resync.pending  # looked at by every cached read
        self._allocation_lock = trio.Lock()
        self._reads = self._writes = self._bytes_read = self._bytes_written = 0

    @property
    def name(self) -> str:
        return self.record.name

    @property
    def size(self) -> int:
        return self.record.size

    def statistics(self) -> VolumeStats:
        return VolumeStats(
            self._reads,
            self._writes,
            self._bytes_read,
            self._bytes_written,
            self.counters.degraded_reads,
            self.counters.healed_blocks,
            len(self.record.slabs),
        )

    # ---- public I/O -----------------------------------------------------------------

    async def read(self, offset: int, length: int) -> bytes | bytearray:
        self._check_range(offset, length)
        fast = self._read_now(offset, length)
        if fast is not None:
            await self.io.inline_checkpoint()
            return fast
        out = bytearray(length)
        view = memoryview(out)
        jobs = [
            bind(self._read_slab, slab, slab_offset, view[start : start + count])
            for slab, slab_offset, start, count in slab_ranges(self.slab_data_size, offset,
                                                               length)
        ]
        await run_all(jobs)
        self._reads += 1
        self._bytes_read += length
        return out

    async def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self._check_range(offset, len(data))
        view = memoryview(data)
        jobs = [
            bind(self._write_slab, slab, slab_offset, view[start : start + count])
            for slab, slab_offset, start, count in slab_ranges(self.slab_data_size, offset,
                                                               len(data))
        ]
        await run_all(jobs)
        self._writes += 1
        self._bytes_written += len(data)

    async def flush(self) -> None:
        """Return once everything written before is durable on every usable disk."""
        await self.pool.flush()

    # ---- region resync after an unclean stop ------------------------------------------

    @property
    def pending_resync(self) -> set[tuple[int, int]]:
        """(slab, region) of every region the last unclean stop left dirty, not resynced
        yet."""
        return self.region_resync.pending

    async def resync_pending(self) -> int:
        """Resync every region the last unclean stop left dirty; returns regions done."""
        return await self.region_resync.resync_all()

    # ---- reads ----------------------------------------------------------------------

    def _read_now(self, offset: int, length: int) -> bytes | bytearray | None:
        """The hot path of a read, with no await: every column piece of one slab in memory
        (checksum entries and data), verified, and no other copy with a newer write. None
        for anything else (a disk out, rot, a resync pending, data not cached): the careful
        path handles it."""
        if self._dirty:
            return None
        slab, slab_offset = divmod(offset, self.slab_data_size)
        if slab_offset + length > self.slab_data_size:
            return None
        extents = self.record.slabs.get(slab)
        if extents is None:
            return None
        pieces = split(self.spec, slab_offset, length)
        if len(pieces) == 1:
            found = self.cached.piece_now(extents, pieces[0])
            if found is None:
                return None
            data, skip = found
            result: bytes | bytearray = (
                data if skip == 0 and len(data) == length else data[skip : skip + length])
        else:  # the reply goes out from this buffer as it is: no copy
            buffer = bytearray(length)
            if not self.redundancy.read_now(extents, pieces, buffer):
                return None
            result = buffer
        self._reads += 1
        self._bytes_read += length
        return result

    async def _read_slab(self, slab: int, offset: int, out: memoryview) -> None:
        await self.region_resync.before_io(slab, offset, offset + len(out))
        while True:
            extents = self.record.slabs.get(slab)
            if extents is None:
                return  # unallocated: reads as zeros, and `out` is already zeroed
            try:
                await self._read_range(slab, extents, offset, out, locked=False)
            except SlabUnmapped:
                pass  # discarded while a heal waited for its locks: zeros now
            # A move that switched the slab's map meanwhile (or a discard that unmapped
            # it) may have freed, and even reused, an extent this read came from: read
            # again from the map as it is now.
            if self.record.slabs.get(slab) is extents:
                return
            out[:] = bytes(len(out))

    async def _read_range(
        self, slab: int, extents: Extents, offset: int, out: memoryview, *, locked: bool
    ) -> None:
        jobs = [
            bind(self._read_piece, slab, extents, piece, out, locked)
            for piece in split(self.spec, offset, len(out))
        ]
        await run_all(jobs)

    async def _read_piece(
        self, slab: int, extents: Extents, piece: Piece, out: memoryview, locked: bool
    ) -> None:
        start = align_down(piece.column_offset)
        end = align_up(piece.column_offset + piece.length)
        data = await self.redundancy.read_column(slab, extents, piece.row, piece.column,
                                                 start, end, locked=locked)
        scatter(self.spec, out, piece, data, piece.column_offset - start)

    # ---- writes ---------------------------------------------------------------------

    async def _write_slab(self, slab: int, offset: int, data: memoryview) -> None:
        # Again if a discard unmapped the slab while this write waited for its row locks.
        while not await self._write_mapped(slab, offset, data):
            pass

    async def _write_mapped(self, slab: int, offset: int, data: memoryview) -> bool:
        """Write into the slab, allocating it first if needed; False if it was unmapped
        before the row locks were had (nothing written)."""
        extents = self.record.slabs.get(slab)
        if extents is None:
            if not any(data):
                return True  # zeros into unallocated space: nothing to store
            extents = await self._allocate(slab)
        end = offset + len(data)
        start, aligned_end = align_down(offset), align_up(end)
        await self.region_resync.before_io(slab, start, aligned_end)
        regions = self.region_resync.regions(slab, start, aligned_end)
        intent = self.pool.intent
        keys = {(self.key, slab, region) for region in regions}
        if intent is not None:
            await intent.begin(keys)
        try:
            return await self._write_locked(slab, offset, data)
        except HostSpaceError:
            # Some copies (columns) may hold the new data and others not: the state an
            # unclean stop leaves, resynced the same way (and kept dirty until then).
            self.region_resync.defer(slab, regions)
            raise
        finally:
            if intent is not None:
                intent.end(keys)

    async def _write_locked(self, slab: int, offset: int, data: memoryview) -> bool:
        end = offset + len(data)
        start, aligned_end = align_down(offset), align_up(end)
        async with self.row_locks.hold(slab_rows(self.spec, slab, start, aligned_end)):
            extents = self.record.slabs.get(slab)  # a move may have switched it
            if extents is None:
                return False  # a discard unmapped it meanwhile
            if (start, aligned_end) != (offset, end):
                data = await self._merge_partial_blocks(slab, extents, offset, data)
            pieces = split(self.spec, start, len(data))
            with self.pool.write_in_flight() as seq:  # the same number on every copy
                await self.redundancy.write_pieces(slab, extents, pieces, data, seq)
        return True

    async def _merge_partial_blocks(
        self, slab: int, extents: Extents, offset: int, data: memoryview
    ) -> memoryview:
        """Read the first and last block of an unaligned write and lay the new bytes over
        them, so the write covers whole blocks. The caller holds the row locks."""
        start, end = align_down(offset), align_up(offset + len(data))
        merged = bytearray(end - start)
        view = memoryview(merged)
        if offset != start:
            await self._read_range(slab, extents, start, view[:BLOCK], locked=True)
        if offset + len(data) != end and (offset == start or end - start > BLOCK):
            await self._read_range(slab, extents, end - BLOCK, view[-BLOCK:], locked=True)
        merged[offset - start : offset - start + len(data)] = data
        return view

    # ---- discard ----------------------------------------------------------------------

    async def discard(self, offset: int, length: int, *, unmap: bool = True) -> None:
        """Make [offset, offset+length) read as zeros (NBD TRIM and WRITE_ZEROES). With
        `unmap`, whole slabs of a thin volume are unmapped and their space goes back to the
        pool; the rest is zeroed through the ordinary write path (volume/discard.py)."""
        self._check_range(offset, length)
        unmap = unmap and can_unmap(self.record, self.pool.metadata.volumes)
        await discard_range(self, offset, length, unmap=unmap)
        self._writes += 1

    def is_mapped(self, slab: int) -> bool:
        return slab in self.record.slabs

    async def unmap_slabs(self, slabs: list[int]) -> int:
        """Unmap whole slabs (a thin volume's); returns how many were mapped. Holds the
        allocation lock (no write allocates one of them meanwhile) and every row lock of
        the slabs (no write, heal, scrub, resync or move of them is half-way)."""
        keys = [key for slab in slabs for key in column_rows(self.spec, slab, 0,
                                                             self.pool.slab_size)]
        async with self._allocation_lock, self.row_locks.hold(keys):
            return await self.pool.free_slabs(self.record, slabs)

    async def _allocate(self, slab: int) -> Extents:
        async with self._allocation_lock:
            extents = self.record.slabs.get(slab)
            if extents is None:
                await self.pool.allocate_slabs(self.record, [slab], degraded_ok=True)
                extents = self.record.slabs[slab]
            return extents

    # ---- geometry -------------------------------------------------------------------

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise InvalidInput(
                f"I/O at {offset}+{length} is outside volume {self.name!r} of {self.size} bytes"
            )
