"""A volume: byte offsets -> slabs -> layout -> concurrent device I/O.

Requests are split per slab, then per row and data column by `layouts.split`; the pieces
of one request run concurrently. Writes hold the locks of the rows they touch, so a parity
read-modify-write or two mirror writes to one row never interleave.
"""

import logging
from collections.abc import AsyncIterator, Iterable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import trio

from blockspace.concurrency import bind, run_all
from blockspace.erasure import ErasureCodec
from blockspace.errors import DeviceError, InvalidInput, Unrecoverable
from blockspace.layouts import (
    LayoutSpec,
    Piece,
    code_position,
    data_positions,
    parity_positions,
    row_start,
    split,
    unit_range,
)
from blockspace.metadata import VolumeRecord
from blockspace.pool import Pool

log = logging.getLogger(__name__)

Extents = list[tuple[int, int]]


class RowLocks:
    """A fixed array of locks that rows hash onto: bounded memory, whatever the volume size.
    Collisions only serialize two unrelated rows; locks are taken in index order."""

    def __init__(self, count: int = 4096) -> None:
        self._locks = [trio.Lock() for _ in range(count)]

    @asynccontextmanager
    async def hold(self, keys: Iterable[tuple[int, int]]) -> AsyncIterator[None]:
        indexes = sorted({hash(key) % len(self._locks) for key in keys})
        taken: list[trio.Lock] = []
        try:
            for index in indexes:
                lock = self._locks[index]
                await lock.acquire()
                taken.append(lock)
            yield
        finally:
            for lock in reversed(taken):
                lock.release()


@dataclass(frozen=True)
class VolumeStats:
    reads: int
    writes: int
    bytes_read: int
    bytes_written: int
    degraded_reads: int
    allocated_slabs: int


class Volume:
    def __init__(self, pool: Pool, record: VolumeRecord) -> None:
        self.pool = pool
        self.record = record
        self.spec = LayoutSpec.from_dict(record.layout)
        self.slab_data_size = self.spec.slab_data_size(pool.slab_size)
        self.codec: ErasureCodec | None = None
        if self.spec.kind == "parity":
            self.codec = ErasureCodec(self.spec.columns, self.spec.parity)
        self._row_locks = RowLocks()
        self._allocation_lock = trio.Lock()
        self._reads = self._writes = self._bytes_read = self._bytes_written = 0
        self._degraded_reads = 0

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
            self._degraded_reads,
            len(self.record.slabs),
        )

    # ---- public I/O -----------------------------------------------------------------

    async def read(self, offset: int, length: int) -> bytes:
        self._check_range(offset, length)
        out = bytearray(length)
        view = memoryview(out)
        jobs = [
            bind(self._read_slab, slab, slab_offset, view[start : start + count])
            for slab, slab_offset, start, count in self._slab_ranges(offset, length)
        ]
        await run_all(jobs)
        self._reads += 1
        self._bytes_read += length
        return bytes(out)

    async def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self._check_range(offset, len(data))
        view = memoryview(data)
        jobs = [
            bind(self._write_slab, slab, slab_offset, view[start : start + count])
            for slab, slab_offset, start, count in self._slab_ranges(offset, len(data))
        ]
        await run_all(jobs)
        self._writes += 1
        self._bytes_written += len(data)

    async def flush(self) -> None:
        """Return once everything written before is durable on every usable disk."""
        await self.pool.flush()

    # ---- geometry -------------------------------------------------------------------

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise InvalidInput(
                f"I/O at {offset}+{length} is outside volume {self.name!r} of {self.size} bytes"
            )

    def _slab_ranges(self, offset: int, length: int) -> Iterator[tuple[int, int, int, int]]:
        """(slab index, offset in slab, offset in request, byte count) per slab touched."""
        position, end = offset, offset + length
        while position < end:
            slab, slab_offset = divmod(position, self.slab_data_size)
            count = min(self.slab_data_size - slab_offset, end - position)
            yield slab, slab_offset, position - offset, count
            position += count

    def _location(self, extents: Extents, position: int, column_offset: int) -> tuple[int, int]:
        disk_id, extent = extents[position]
        return disk_id, self.pool.extent_offset(disk_id, extent) + column_offset

    # ---- reads ----------------------------------------------------------------------

    async def _read_slab(self, slab: int, offset: int, out: memoryview) -> None:
        extents = self.record.slabs.get(slab)
        if extents is None:
            return  # unallocated: reads as zeros, and `out` is already zeroed
        jobs = [
            bind(self._read_piece, slab, extents, piece, out)
            for piece in split(self.spec, offset, len(out))
        ]
        await run_all(jobs)

    async def _read_piece(self, slab: int, extents: Extents, piece: Piece, out: memoryview) -> None:
        target = out[piece.buf_offset : piece.buf_offset + piece.length]
        if self.spec.kind == "parity":
            data = await self._read_at(extents, code_position(self.spec, piece.row, piece.column),
                                       piece.column_offset, piece.length)
            if data is None:
                self._degraded_reads += 1
                start, end = unit_range(self.spec, piece)
                async with self._row_locks.hold([(slab, piece.row)]):
                    rebuilt = await self._read_fragments(extents, piece.row, start, end,
                                                         [piece.column])
                data = rebuilt[piece.column]
            target[:] = data
            return
        for attempt, position in enumerate(data_positions(self.spec, piece.row, piece.column)):
            data = await self._read_at(extents, position, piece.column_offset, piece.length)
            if data is not None:
                if attempt:
                    self._degraded_reads += 1
                target[:] = data
                return
        raise Unrecoverable(
            f"volume {self.name!r}: no readable copy of slab {slab} at {piece.column_offset}"
        )

    async def _read_at(
        self, extents: Extents, position: int, column_offset: int, length: int
    ) -> bytes | None:
        """One extent read; None if its disk is unusable or the read failed."""
        disk_id, offset = self._location(extents, position, column_offset)
        device = self.pool.device(disk_id)
        if device is None:
            return None
        try:
            return await device.read(offset, length)
        except DeviceError as error:
            self.pool.disks[disk_id].errors["read"] += 1
            log.warning("read error on disk %d: %s", disk_id, error)
            return None

    async def _read_fragments(
        self, extents: Extents, row: int, start: int, end: int, wanted: list[int]
    ) -> dict[int, bytes]:
        """Parity: the [start, end) range of code fragments `wanted` in `row`, rebuilding
        from the other fragments when some cannot be read. Caller holds the row lock."""
        assert self.codec is not None
        found: dict[int, bytes] = {}
        column_offset = row_start(self.spec, row) + start

        async def fetch(index: int) -> None:
            position = code_position(self.spec, row, index)
            data = await self._read_at(extents, position, column_offset, end - start)
            if data is not None:
                found[index] = data

        await run_all([bind(fetch, index) for index in wanted])
        if all(index in found for index in wanted):
            return found
        others = [i for i in range(self.spec.width) if i not in wanted]
        await run_all([bind(fetch, index) for index in others])
        if len(found) < self.spec.columns:
            raise Unrecoverable(
                f"volume {self.name!r}: row {row} has only {len(found)} of the "
                f"{self.spec.columns} fragments needed"
            )
        return self.codec.reconstruct(found, wanted)

    # ---- writes ---------------------------------------------------------------------

    async def _write_slab(self, slab: int, offset: int, data: memoryview) -> None:
        extents = self.record.slabs.get(slab)
        if extents is None:
            if not any(data):
                return  # zeros into unallocated space: nothing to store
            extents = await self._allocate(slab)
        pieces = split(self.spec, offset, len(data))
        rows = {(slab, row) for piece in pieces for row in self._rows_of(piece)}
        async with self._row_locks.hold(rows):
            if self.spec.kind == "parity":
                by_row: dict[int, list[Piece]] = {}
                for piece in pieces:
                    by_row.setdefault(piece.row, []).append(piece)
                jobs = [
                    bind(self._write_parity_row, extents, row, row_pieces, data)
                    for row, row_pieces in by_row.items()
                ]
            else:
                jobs = [bind(self._write_copies, slab, extents, piece, data) for piece in pieces]
            await run_all(jobs)

    def _rows_of(self, piece: Piece) -> range:
        last = (piece.column_offset + piece.length - 1) // self.spec.interleave
        return range(piece.row, last + 1)

    async def _allocate(self, slab: int) -> Extents:
        async with self._allocation_lock:
            extents = self.record.slabs.get(slab)
            if extents is None:
                await self.pool.allocate_slabs(self.record, [slab])
                extents = self.record.slabs[slab]
            return extents

    async def _write_at(
        self, extents: Extents, position: int, column_offset: int, data: memoryview | bytes
    ) -> bool:
        """One extent write; False if its disk is unusable or failed (then marked failed)."""
        disk_id, offset = self._location(extents, position, column_offset)
        device = self.pool.device(disk_id)
        if device is None:
            return False
        try:
            await device.write(offset, data)
            return True
        except DeviceError as error:
            self.pool.disks[disk_id].errors["write"] += 1
            await self.pool.mark_failed(disk_id, str(error))
            return False

    async def _write_copies(
        self, slab: int, extents: Extents, piece: Piece, data: memoryview
    ) -> None:
        payload = data[piece.buf_offset : piece.buf_offset + piece.length]
        written = 0

        async def write_one(position: int) -> None:
            nonlocal written
            if await self._write_at(extents, position, piece.column_offset, payload):
                written += 1

        positions = data_positions(self.spec, piece.row, piece.column)
        await run_all([bind(write_one, position) for position in positions])
        if written == 0:
            raise Unrecoverable(
                f"volume {self.name!r}: no copy of slab {slab} at {piece.column_offset} "
                "could be written"
            )

    async def _write_parity_row(
        self, extents: Extents, row: int, pieces: list[Piece], data: memoryview
    ) -> None:
        """Write the pieces of one row and its parity. A row fully covered is encoded from
        the new data alone; otherwise the untouched part of the span is read first."""
        assert self.codec is not None
        ranges = {piece.column: unit_range(self.spec, piece) for piece in pieces}
        start = min(r[0] for r in ranges.values())
        end = max(r[1] for r in ranges.values())
        to_read = [c for c in range(self.spec.columns) if ranges.get(c) != (start, end)]
        old = await self._read_fragments(extents, row, start, end, to_read) if to_read else {}
        columns: list[bytes | bytearray] = []
        for column in range(self.spec.columns):
            buffer = bytearray(old[column]) if column in old else bytearray(end - start)
            columns.append(buffer)
        for piece in pieces:
            piece_start, piece_end = ranges[piece.column]
            payload = data[piece.buf_offset : piece.buf_offset + piece.length]
            columns[piece.column][piece_start - start : piece_end - start] = payload
        parity = self.codec.encode(columns)
        async def write_one(position: int, column_offset: int, payload: bytes | memoryview) -> None:
            await self._write_at(extents, position, column_offset, payload)

        jobs = []
        for piece in pieces:
            position = code_position(self.spec, row, piece.column)
            payload = data[piece.buf_offset : piece.buf_offset + piece.length]
            jobs.append(bind(write_one, position, piece.column_offset, payload))
        parity_offset = row_start(self.spec, row) + start
        for position, block in zip(parity_positions(self.spec, row), parity, strict=True):
            jobs.append(bind(write_one, position, parity_offset, block))
        await run_all(jobs)
        # The row is recoverable only while no more than `parity` of its extents are lost,
        # counting disks that were already out as well as writes that just failed.
        lost = sum(self.pool.device(disk_id) is None for disk_id, _ in extents)
        if lost > self.spec.parity:
            raise Unrecoverable(
                f"volume {self.name!r}: {lost} columns of row {row} are unavailable"
            )

