"""Parity volumes: each row k data fragments and m parity fragments (Reed-Solomon), on the
k + m extents of a slab, parity rotating by row.

Every repair of a row is one routine: read the row's fragments (`read_row`: each checked
against its checksums), rebuild what is missing or corrupt from any k good ones, and
rewrite it (`rewrite_row`). A read's self-heal (`fragments`), a scrub (`check`) and a
returning disk's catch-up (`catch_up`) use it; a region resync after an unclean stop
(`make_consistent`) reads the row the same way but re-encodes the parity from the data as
it stands, since there a mismatch is a torn write, not rot.
"""

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

from blockspace.errors import DeviceError, Unrecoverable
from blockspace.geometry.erasure import ErasureCodec
from blockspace.geometry.layouts import (
    ExtentWrite,
    LayoutSpec,
    Piece,
    coalesce,
    code_position,
    parity_positions,
    row_start,
    unit_range,
)
from blockspace.ondisk.checksums import CSUM_BLOCK, bad_blocks, entries_for, entry_at, entry_seq
from blockspace.volume.cached_reads import CachedReads
from blockspace.volume.concurrency import bind, run_all
from blockspace.volume.extent_io import ExtentIO, Extents, Fault
from blockspace.volume.redundancy import Check, Counters
from blockspace.volume.row_locks import RowLocks

log = logging.getLogger(__name__)

CATCH_UP_CHUNK = 1 << 20  # extent bytes whose entries a catch-up compares per step


def fragment_index(spec: LayoutSpec, row: int, position: int) -> int:
    """Which code fragment of `row` the extent at `position` holds (`code_position`'s
    inverse): below k a data column, from k on a parity fragment."""
    return (position - row) % spec.width


def rows_written_since(
    entries: dict[int, bytes], skip: int, rows: Iterable[int], blocks_per_row: int, since: int
) -> list[int]:
    """The rows (numbered within the compared range) in which some column other than
    `skip` holds a block written by write `since` or later (`since` itself was in flight
    when the disk left, and may be what failed it). `entries`: position -> entries."""
    written = []
    for row in rows:
        first = row * blocks_per_row
        for position, raw in entries.items():
            if position == skip:
                continue
            if any(entry_seq(entry_at(raw, first + b)) >= since for b in range(blocks_per_row)):
                written.append(row)
                break
    return written


@dataclass
class RowRead:
    """What reading some fragments of a row gave, by fragment index."""

    raw: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)  # data, entries as read
    good: dict[int, bytes] = field(default_factory=dict)  # of those, the ones that verify
    corrupt: list[int] = field(default_factory=list)  # read, but failing their checksum
    # Fragments not in `raw` gave nothing: their disk is out or the read failed.

    def add(self, other: "RowRead") -> None:
        self.raw.update(other.raw)
        self.good.update(other.good)
        self.corrupt += other.corrupt


class Parity:
    """The `Redundancy` of parity volumes."""

    def __init__(
        self, io: ExtentIO, spec: LayoutSpec, locks: RowLocks, cached: CachedReads,
        counters: Counters, codec: ErasureCodec,
    ) -> None:
        self.io = io
        self.pool = io.pool
        self.spec = spec
        self.locks = locks
        self.cached = cached
        self.counters = counters
        self.codec = codec

    # ---- the I/O path -----------------------------------------------------------------

    def read_now(self, extents: Extents, pieces: list[Piece], buffer: bytearray) -> bool:
        return self.cached.spans_now(extents, pieces, buffer)

    async def read_column(
        self, slab: int, extents: Extents, row: int, column: int, start: int, end: int,
        *, locked: bool,
    ) -> bytes:
        """The data column directly, else rebuilt from the row (under its lock)."""
        result = await self.io.read_verified(extents, code_position(self.spec, row, column),
                                             start, end)
        if isinstance(result, bytes):
            return result
        self.counters.degraded_reads += 1
        unit_start = start - row_start(self.spec, row)
        unit_end = end - row_start(self.spec, row)
        if not locked:
            async with self.locks.hold([(slab, row)]):
                extents = self.io.current_extents(slab)
                rebuilt = await self.fragments(slab, extents, row, unit_start, unit_end, [column])
        else:
            rebuilt = await self.fragments(slab, extents, row, unit_start, unit_end, [column])
        return rebuilt[column]

    async def write_pieces(
        self, slab: int, extents: Extents, pieces: list[Piece], data: memoryview, seq: int
    ) -> None:
        """Write the pieces and the parity of the rows they touch. Each row is encoded on
        its own; then each disk's fragments of consecutive rows, contiguous in its extent,
        go out as one write (a large request: one device write per disk, not per row)."""
        by_row: dict[int, list[Piece]] = {}
        for piece in pieces:
            by_row.setdefault(piece.row, []).append(piece)
        writes: list[ExtentWrite] = []

        async def encode(row: int, row_pieces: list[Piece]) -> None:
            writes.extend(await self._row_writes(slab, extents, row, row_pieces, data))

        await run_all([bind(encode, row, row_pieces) for row, row_pieces in by_row.items()])

        await self.io.write_extents(extents, coalesce(writes), seq)
        # The rows are recoverable only while no more than `parity` of the slab's extents are
        # lost, counting disks that were already out as well as writes that just failed.
        lost = sum(self.pool.extent_device(*extent) is None for extent in extents)
        if lost > self.spec.parity:
            rows = sorted(by_row)
            raise Unrecoverable(
                f"volume {self.io.name!r}: {lost} columns of slab {slab} rows "
                f"{rows[0]}-{rows[-1]} are unavailable"
            )

    async def _row_writes(
        self, slab: int, extents: Extents, row: int, pieces: list[Piece], data: memoryview
    ) -> list[ExtentWrite]:
        """The extent writes that put one row's pieces and its new parity on disk. A row
        fully covered is encoded from the new data alone; otherwise the untouched part of
        the span is read first."""
        ranges = {piece.column: unit_range(self.spec, piece) for piece in pieces}
        start = min(r[0] for r in ranges.values())
        end = max(r[1] for r in ranges.values())
        to_read = [c for c in range(self.spec.columns) if ranges.get(c) != (start, end)]
        old = await self.fragments(slab, extents, row, start, end, to_read) if to_read else {}
        columns: list[bytearray] = []
        for column in range(self.spec.columns):
            columns.append(bytearray(old[column]) if column in old else bytearray(end - start))
        writes: list[ExtentWrite] = []
        for piece in pieces:
            piece_start, piece_end = ranges[piece.column]
            payload = data[piece.buf_offset : piece.buf_offset + piece.length]
            columns[piece.column][piece_start - start : piece_end - start] = payload
            position = code_position(self.spec, row, piece.column)
            writes.append((position, piece.column_offset, payload))
        parity = self.codec.encode(columns)
        parity_offset = row_start(self.spec, row) + start
        for position, block in zip(parity_positions(self.spec, row), parity, strict=True):
            writes.append((position, parity_offset, block))
        return writes

    # ---- a row read, rebuilt and rewritten: the one routine ---------------------------

    async def read_row(
        self, extents: Extents, row: int, start: int, end: int, indexes: Iterable[int]
    ) -> RowRead:
        """Extent bytes [start, end) of the row's fragments `indexes`, read concurrently,
        each checked against its checksum entries."""
        indexes = list(indexes)
        results: dict[int, tuple[bytes, bytes] | Fault] = {}

        async def fetch(index: int) -> None:
            position = code_position(self.spec, row, index)
            results[index] = await self.io.read_raw(extents, position, start, end)

        await run_all([bind(fetch, index) for index in indexes])
        found = RowRead()
        for index in indexes:  # in index order, whatever order the reads finished in
            raw = results[index]
            if isinstance(raw, Fault):
                continue
            found.raw[index] = raw
            if bad_blocks(*raw):
                found.corrupt.append(index)
            else:
                found.good[index] = raw[0]
        return found

    async def rewrite_row(
        self, extents: Extents, row: int, start: int, fragments: dict[int, bytes], *,
        catching_up: bool = False,
    ) -> list[int]:
        """Write fragments of a row at extent offset `start` (all as one new write number);
        returns the indexes written (the others' disks are out, or were just failed)."""
        seq = self.pool.next_seq()
        written = []
        for index, data in sorted(fragments.items()):
            position = code_position(self.spec, row, index)
            if await self.io.write_verified(extents, position, start, data, seq=seq,
                                            catching_up=catching_up):
                written.append(index)
        return written

    async def count_corrupt(
        self, slab: int, extents: Extents, row: int, found: RowRead, *, warn: bool
    ) -> None:
        """Corrupt fragments count against their disks."""
        for index in found.corrupt:
            disk_id, extent = extents[code_position(self.spec, row, index)]
            if warn:
                log.warning("checksum mismatch on disk %d, extent %d (slab %d row %d)",
                            disk_id, extent, slab, row)
            await self.pool.count_checksum_errors(disk_id, 1)

    async def fragments(
        self, slab: int, extents: Extents, row: int, start: int, end: int, wanted: list[int]
    ) -> dict[int, bytes]:
        """A read's self-heal: bytes [start, end) of the row's unit for code fragments
        `wanted`, rebuilt from the others when some are missing or corrupt; corrupt ones
        are rewritten. The caller holds the row lock."""
        offset = row_start(self.spec, row) + start
        stop = offset + end - start
        # The usual case, a small write's read-modify-write: every fragment in memory and
        # sound. Taken at once, with no task per fragment.
        now: dict[int, bytes] = {}
        for index in wanted:
            data = self.io.extent_now(extents, code_position(self.spec, row, index), offset,
                                      stop)
            if data is None:
                break  # the careful path below reads them all
            now[index] = data
        else:
            return now
        found = await self.read_row(extents, row, offset, stop, wanted)
        await self.count_corrupt(slab, extents, row, found, warn=True)
        if all(index in found.good for index in wanted):
            return {index: found.good[index] for index in wanted}
        others = await self.read_row(extents, row, offset, stop,
                                     [i for i in range(self.spec.width) if i not in wanted])
        await self.count_corrupt(slab, extents, row, others, warn=True)
        found.add(others)
        if len(found.good) < self.spec.columns:
            raise Unrecoverable(
                f"volume {self.io.name!r}: slab {slab} row {row} has only {len(found.good)} "
                f"good fragments of the {self.spec.columns} needed"
            )
        rebuilt = self.codec.reconstruct(found.good, sorted(set(wanted) | set(found.corrupt)))
        healed = await self.rewrite_row(extents, row, offset,
                                        {index: rebuilt[index] for index in found.corrupt})
        for index in healed:
            self.counters.healed_blocks += (end - start) // CSUM_BLOCK
            log.info("healed slab %d row %d fragment %d", slab, row, index)
        return {index: rebuilt[index] for index in wanted}

    # ---- the repairs ------------------------------------------------------------------

    async def extent_contents(
        self, slab: int, extents: Extents, position: int, start: int, end: int
    ) -> tuple[bytes, bytes]:
        """Row by row, the extent's own fragment if it verifies, else rebuilt from the row;
        entries for a new write number."""
        parts = []
        unit = self.spec.interleave
        for row in range(start // unit, end // unit):
            offset = row_start(self.spec, row)
            result = await self.io.read_verified(extents, position, offset, offset + unit)
            if isinstance(result, bytes):
                parts.append(result)
                continue
            index = fragment_index(self.spec, row, position)
            rebuilt = await self.fragments(slab, extents, row, 0, unit, [index])
            parts.append(rebuilt[index])
        data = b"".join(parts)
        return data, entries_for(data, self.pool.next_seq())

    async def check(
        self, slab: int, extents: Extents, start: int, end: int, *, repair: bool
    ) -> Check:
        """Every fragment of every row is checked; bad fragments are rebuilt from the good
        ones when at least k are good; then the parity is compared with the data and
        rewritten if it does not match."""
        spec = self.spec
        unit = spec.interleave
        found = Check()
        for row in range(start // unit, end // unit):
            offset = row_start(spec, row)
            fragments = await self.read_row(extents, row, offset, offset + unit, range(spec.width))
            found.blocks_checked += unit // CSUM_BLOCK * len(fragments.raw)
            found.bytes_checked += unit * len(fragments.raw)
            found.checksum_errors += len(fragments.corrupt)
            await self.count_corrupt(slab, extents, row, fragments, warn=False)
            if len(fragments.good) < spec.columns:
                for index in fragments.corrupt:
                    if index < spec.columns:
                        found.unrecoverable.append((index, offset, unit))
                continue
            full = self.codec.reconstruct(fragments.good, list(range(spec.width)))
            parity = self.codec.encode([full[i] for i in range(spec.columns)])
            bad = list(fragments.corrupt)
            for i in range(spec.parity):
                index = spec.columns + i
                if index in fragments.good and fragments.good[index] != parity[i]:
                    found.mismatches += 1
                    bad.append(index)
                full[index] = parity[i]
            if repair:
                written = await self.rewrite_row(extents, row, offset,
                                                 {index: full[index] for index in bad})
                found.repaired_blocks += unit // CSUM_BLOCK * len(written)
        return found

    async def make_consistent(self, extents: Extents, start: int, end: int) -> int:
        """The data fragments are taken as they are (old or new per block), their checksums
        are rewritten to match, and parity is recomputed from them. This closes the write
        hole for rows whose disks are all present. A row with a disk missing cannot be made
        consistent (its missing column depends on the parity being right): it is left as
        is and logged."""
        spec = self.spec
        rewritten = 0
        for row in range(start // spec.interleave, end // spec.interleave):
            offset = row_start(spec, row)
            fragments = await self.read_row(extents, row, offset, offset + spec.interleave,
                                            range(spec.width))
            if len(fragments.raw) < spec.width:
                log.warning(
                    "volume %s: row %d of a dirty region has a disk missing; parity not "
                    "recomputed (write hole possible there)", self.io.name, row,
                )
                continue
            data = [fragments.raw[index][0] for index in range(spec.columns)]
            wanted = data + self.codec.encode(data)
            stale = {
                index: wanted[index] for index in range(spec.width)
                if fragments.raw[index][0] != wanted[index] or index in fragments.corrupt
            }
            await self.rewrite_row(extents, row, offset, stale)
            rewritten += len(stale) * (spec.interleave // CSUM_BLOCK)
        return rewritten

    async def catch_up(self, slab: int, extents: Extents, position: int, since: int) -> int:
        """Rebuild every row in which another column carries write `since` or a later one,
        from columns on disks that never left only (a returning disk's column may be stale
        for that row: disks brought back together turn online together at the end); rows
        nobody wrote since are trusted as they are. The extent stays in `Pool.resyncing`,
        absent to every read, until all its rows are done."""
        spec = self.spec
        unit = spec.interleave
        blocks_per_row = unit // CSUM_BLOCK
        rewritten = 0
        step = max(CATCH_UP_CHUNK, unit)
        for start in range(0, self.pool.slab_size, step):
            end = start + step
            entries = await self.io.entries_by_position(extents, range(spec.width), start, end,
                                                        catching_up=True)
            rows = range((end - start) // unit)
            for local in rows_written_since(entries, position, rows, blocks_per_row, since):
                row = start // unit + local
                index = fragment_index(spec, row, position)
                rebuilt = await self._rebuild_from_stayers(extents, row, index)
                if rebuilt is None:
                    # Fewer than k columns stayed in service: the newer writes the others
                    # hold were never acknowledged (the row was beyond its tolerance), and
                    # what the returning disk holds is the acknowledged data. Keep it; the
                    # write-intent log resyncs the row's parity at the next mount if the
                    # write was torn.
                    log.warning("slab %d row %d kept as it is on the returning disk", slab, row)
                    continue
                offset = row_start(spec, row)
                if not await self.rewrite_row(extents, row, offset, {index: rebuilt},
                                              catching_up=True):
                    raise DeviceError(f"disk {extents[position][0]} failed while catching up")
                rewritten += unit
        self.pool.resyncing.discard(extents[position])
        return rewritten

    async def _rebuild_from_stayers(
        self, extents: Extents, row: int, index: int
    ) -> bytes | None:
        """Code fragment `index` of a row rebuilt only from columns on disks that never
        left (a returning disk's column may be stale for this row), read one by one until
        k verify; None if fewer than k do."""
        spec = self.spec
        offset = row_start(spec, row)
        found = RowRead()
        for other in range(spec.width):
            disk_id, _ = extents[code_position(spec, row, other)]
            if other == index or self.pool.disks[disk_id].record.state == "resyncing":
                continue
            found.add(await self.read_row(extents, row, offset, offset + spec.interleave,
                                          [other]))
            if len(found.good) == spec.columns:
                return self.codec.reconstruct(found.good, [index])[index]
        return None
