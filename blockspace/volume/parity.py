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
from blockspace.ondisk.checksums import (
    CSUM_BLOCK,
    bad_blocks,
    block_runs,
    entries_for,
    entries_with_seqs,
    entry_at,
    entry_seq,
    entry_seqs,
    unwritten_flags,
)
from blockspace.volume.cached_reads import CachedReads
from blockspace.volume.concurrency import bind, run_all
from blockspace.volume.extent_io import ExtentIO, Extents, Fault
from blockspace.volume.redundancy import Check, Counters
from blockspace.volume.row_judge import (
    Verdict,
    judge_row,
    needs_judging,
    one_write,
    row_looks_behind,
    torn_contents,
)
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
        """The data column directly, else rebuilt from the row (under its lock): when it
        is out or bad, and when its entries say it is behind its row (`needs_judging`: it
        claims "never written" where the row holds a write, or parity carries a write it
        lacks), which the row then decides."""
        position = code_position(self.spec, row, column)
        result = await self.io.read_checked(extents, position, start, end)
        if isinstance(result, tuple):
            data, entries = result
            others = await self.io.entries_by_position(
                extents, [p for p in range(self.spec.width) if p != position], start, end)
            by_index = {fragment_index(self.spec, row, p): e for p, e in others.items()}
            by_index[column] = entries
            if not needs_judging(column, self.spec.columns, by_index):
                return data
        else:
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
        writes += await self._stamps(extents, row, start, end, ranges, columns)
        parity = self.codec.encode(columns)
        parity_offset = row_start(self.spec, row) + start
        for position, block in zip(parity_positions(self.spec, row), parity, strict=True):
            writes.append((position, parity_offset, block))
        return writes

    async def _stamps(
        self, extents: Extents, row: int, start: int, end: int,
        ranges: dict[int, tuple[int, int]], columns: list[bytearray],
    ) -> list[ExtentWrite]:
        """The first write of a row's block stamps every data column there: a column the
        write does not touch whose entry says "never written" gets its zeros written with
        a real entry, by the same write. So in a written block of a row every fragment is
        written, and "never written" beside a written block is damage, located as such
        (row_judge.py) rather than a guess between two columns that both claim it."""
        writes: list[ExtentWrite] = []
        base = row_start(self.spec, row)
        first, count = (base + start) // CSUM_BLOCK, (end - start) // CSUM_BLOCK
        for column in range(self.spec.columns):
            touched = ranges.get(column)
            if touched == (start, end):
                continue
            position = code_position(self.spec, row, column)
            disk_id, extent = extents[position]
            if self.pool.extent_device(disk_id, extent) is None:
                continue
            entries = self.pool.checksums.read_cached(disk_id, extent, first, count)
            if entries is None:
                found = await self.io.entries_by_position(extents, [position], base + start,
                                                          base + end)
                entries = found.get(position)
                if entries is None:
                    continue
            flags = unwritten_flags(entries)
            blocks = [b for b, empty in enumerate(flags) if empty and not (
                touched and touched[0] <= start + b * CSUM_BLOCK < touched[1])]
            for lo_block, run in block_runs(blocks):
                lo, hi = lo_block * CSUM_BLOCK, (lo_block + run) * CSUM_BLOCK
                writes.append((position, base + start + lo, bytes(columns[column][lo:hi])))
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
        catching_up: bool = False, verdict: Verdict | None = None,
    ) -> list[int]:
        """Write fragments of a row at extent offset `start`; returns the indexes written
        (the others' disks are out, or were just failed). With the `verdict` the row was
        judged by, each block keeps the row's write number (so sequence numbers go on
        telling which fragment is behind); without, all get a new one."""
        seq = self.pool.next_seq()
        written = []
        for index, data in sorted(fragments.items()):
            position = code_position(self.spec, row, index)
            entries = None
            if verdict is not None and verdict.seqs:
                entries = entries_with_seqs(data, verdict.seqs, verdict.unwritten)
            if await self.io.write_verified(extents, position, start, data, seq=seq,
                                            entries=entries, catching_up=catching_up):
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

    async def count_bad(
        self, slab: int, extents: Extents, row: int, verdict: Verdict, *, warn: bool
    ) -> None:
        """Every fragment the row found bad counts against its disk: failing its checksum,
        or verifying but behind its row (zeroed, or a lost write)."""
        for index, why in sorted(verdict.bad.items()):
            disk_id, extent = extents[code_position(self.spec, row, index)]
            if warn:
                log.warning("%s fragment %d on disk %d, extent %d (slab %d row %d)",
                            "checksum mismatch:" if why == "corrupt" else f"{why}:",
                            index, disk_id, extent, slab, row)
            await self.pool.count_checksum_errors(disk_id, 1)

    def suspect_now(
        self, extents: Extents, row: int, index: int, start: int, end: int, entries: bytes
    ) -> bool:
        return self.cached.behind_row_now(extents, row, index, start, end, entries)

    async def fragments(
        self, slab: int, extents: Extents, row: int, start: int, end: int, wanted: list[int]
    ) -> dict[int, bytes]:
        """A read's self-heal: bytes [start, end) of the row's unit for code fragments
        `wanted`, rebuilt from the others when some are missing, corrupt or behind the row
        (`row_judge`); the bad ones are rewritten. The caller holds the row lock."""
        offset = row_start(self.spec, row) + start
        stop = offset + end - start
        # The usual case, a small write's read-modify-write: every fragment in memory, sound
        # and not behind its row. Taken at once, with no task per fragment.
        now: dict[int, bytes] = {}
        for index in wanted:
            disk_id, extent = extents[code_position(self.spec, row, index)]
            device = self.pool.extent_device(disk_id, extent)
            cached = (self.io.cached_blocks(device, disk_id, extent, offset, stop)
                      if device else None)
            if (cached is None or bad_blocks(*cached)
                    or self.suspect_now(extents, row, index, offset, stop, cached[1])):
                break  # the careful path below reads them all
            now[index] = cached[0]
        else:
            return now
        found = await self.read_row(extents, row, offset, stop, wanted)
        if all(index in found.good for index in wanted):  # sound: behind their row?
            positions = {code_position(self.spec, row, i) for i in range(self.spec.width)}
            others = await self.io.entries_by_position(
                extents, sorted(positions - {code_position(self.spec, row, i) for i in wanted}),
                offset, stop)
            by_index = {fragment_index(self.spec, row, p): e for p, e in others.items()}
            by_index.update({index: found.raw[index][1] for index in wanted})
            if not any(needs_judging(index, self.spec.columns, by_index) for index in wanted):
                return {index: found.good[index] for index in wanted}
        rebuilt, _ = await self.judged(slab, extents, row, offset, stop, wanted)
        return rebuilt

    async def judged(
        self, slab: int, extents: Extents, row: int, offset: int, stop: int, wanted: list[int],
        *, heal: bool = True,
    ) -> tuple[dict[int, bytes], Verdict]:
        """Extent bytes [offset, stop) of fragments `wanted` of a row, as its judgment
        (`row_judge`) of every fragment says: the bad ones rebuilt from the ones it trusts,
        and (`heal`) rewritten. Unrecoverable if the row cannot say."""
        found = await self.read_row(extents, row, offset, stop, range(self.spec.width))
        verdict = judge_row(self.codec, found.raw, self.spec.width)
        await self.count_bad(slab, extents, row, verdict, warn=True)
        if not verdict.ok:
            if all(verdict.as_it_is(index) for index in wanted):
                # Nothing can contradict them (no spare fragment): served as they are, and
                # nothing rewritten. Only a rebuild would rest on the fragments in doubt.
                return {index: verdict.trusted[index] for index in wanted}, verdict
            raise Unrecoverable(
                f"volume {self.io.name!r}: slab {slab} row {row} at extent offset {offset} "
                f"cannot be trusted: {verdict.problem}"
            )
        if heal and verdict.checked:
            await self._stamp_current(extents, row, offset, found, verdict)
        if not verdict.bad and all(index in verdict.trusted for index in wanted):
            return {index: verdict.trusted[index] for index in wanted}, verdict
        rebuilt = self.codec.reconstruct(verdict.trusted, sorted(set(wanted) | set(verdict.bad)))
        if heal and verdict.bad:
            healed = await self.rewrite_row(extents, row, offset,
                                            {index: rebuilt[index] for index in verdict.bad},
                                            verdict=verdict)
            for index in healed:
                self.counters.healed_blocks += (stop - offset) // CSUM_BLOCK
                log.info("healed slab %d row %d fragment %d (%s)", slab, row, index,
                         verdict.bad[index])
        return {index: rebuilt[index] for index in wanted}, verdict

    async def _stamp_current(
        self, extents: Extents, row: int, offset: int, found: RowRead, verdict: Verdict
    ) -> None:
        """Data fragments the row proved current though their entries carry an older write
        (another column took the newest) get the row's write number: their next read needs
        no judgment. Their data is written again as it is."""
        for index, data in sorted(verdict.trusted.items()):
            if index >= self.spec.columns or index not in found.raw:
                continue
            seqs = entry_seqs(found.raw[index][1])
            if any(own < top for own, top in zip(seqs, verdict.seqs, strict=True)):
                await self.rewrite_row(extents, row, offset, {index: data}, verdict=verdict)

    # ---- the repairs ------------------------------------------------------------------

    async def extent_contents(
        self, slab: int, extents: Extents, position: int, start: int, end: int
    ) -> tuple[bytes, bytes]:
        """Row by row, the extent's own fragment if it verifies and is not behind its row,
        else rebuilt from the row; each block keeps its row's write number."""
        parts, entries = [], []
        unit = self.spec.interleave
        for row in range(start // unit, end // unit):
            offset = row_start(self.spec, row)
            index = fragment_index(self.spec, row, position)
            result = await self.io.read_checked(extents, position, offset, offset + unit)
            if isinstance(result, tuple) and not self.suspect_now(
                    extents, row, index, offset, offset + unit, result[1]):
                parts.append(result[0])
                entries.append(result[1])
                continue
            rebuilt, verdict = await self.judged(slab, extents, row, offset, offset + unit,
                                                 [index])
            parts.append(rebuilt[index])
            entries.append(entries_with_seqs(rebuilt[index], verdict.seqs, verdict.unwritten)
                           if verdict.seqs else entries_for(rebuilt[index],
                                                            self.pool.next_seq()))
        return b"".join(parts), b"".join(entries)

    async def check(
        self, slab: int, extents: Extents, start: int, end: int, *, repair: bool
    ) -> Check:
        """Every fragment of every row is read and the row judged (`row_judge`): fragments
        failing their checksum, claiming "never written" where the row holds a write, or
        behind the row's newest write are rebuilt from the fragments the row trusts. A row
        that cannot tell is reported unrecoverable, and nothing of it is rewritten."""
        spec = self.spec
        unit = spec.interleave
        found = Check()
        for row in range(start // unit, end // unit):
            offset = row_start(spec, row)
            fragments = await self.read_row(extents, row, offset, offset + unit, range(spec.width))
            found.blocks_checked += unit // CSUM_BLOCK * len(fragments.raw)
            found.bytes_checked += unit * len(fragments.raw)
            verdict = judge_row(self.codec, fragments.raw, spec.width)
            await self.count_bad(slab, extents, row, verdict, warn=False)
            reasons = list(verdict.bad.values())
            found.checksum_errors += reasons.count("corrupt") + reasons.count("unwritten")
            found.mismatches += reasons.count("stale")
            if not verdict.ok:
                columns = [i for i in verdict.bad if i < spec.columns] or range(spec.columns)
                for index in columns:
                    found.unrecoverable.append((index, offset, unit))
                log.warning("volume %s: slab %d row %d unrecoverable, left as it is: %s",
                            self.io.name, slab, row, verdict.problem)
                continue
            if not verdict.bad:
                continue
            full = self.codec.reconstruct(verdict.trusted, sorted(verdict.bad))
            if repair:
                written = await self.rewrite_row(
                    extents, row, offset, {index: full[index] for index in verdict.bad},
                    verdict=verdict)
                found.repaired_blocks += unit // CSUM_BLOCK * len(written)
        return found

    async def make_consistent(self, extents: Extents, start: int, end: int) -> int:
        """A dirty region: a write may have reached some fragments and not others, its data
        and not its checksum, or (the first write of a row's block) not the stamps of the
        columns it did not touch. Every fragment that verifies there holds a legal version
        (old or new) of its blocks, "never written" included: a stamp that did not land.

        The row is judged first (`row_judge`); where it locates the fragments behind the
        row and either proves it (a spare fragment agrees) or the fragments it trusts are
        all of one write (`one_write`), they are rebuilt from those (the write's new
        contents, or the old). Otherwise (a torn write can leave several fragments behind,
        none of them damage, and a parity that assumed a data version that never landed)
        the data fragments are taken as they are (`torn_contents`) and parity recomputed
        from them: old or new per block, both legal. Then every fragment of a
        row that was not already consistent and current is rewritten with one new write
        number (`_stamp_row`): afterwards nothing in it looks behind its row, so a read
        with a disk out finds a row it can serve instead of a torn write's leftovers it
        must refuse. A row with a disk missing cannot be made consistent (its missing
        column depends on the parity being right): it is left as is and logged."""
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
            verdict = judge_row(self.codec, fragments.raw, spec.width)
            if verdict.ok and not verdict.bad and not row_looks_behind(
                    spec.columns, fragments.raw):
                continue  # consistent, and every fragment current: nothing to do
            if verdict.ok and (verdict.checked or not verdict.bad
                               or one_write(fragments.raw, verdict.trusted)):
                full = dict(verdict.trusted)
                full.update(self.codec.reconstruct(verdict.trusted, sorted(verdict.bad)))
            else:  # unproven, and the fragments it would rebuild from may be of two writes
                full = torn_contents(self.codec, fragments.raw)
            rewritten += await self._stamp_row(extents, row, offset, fragments.raw, full)
        return rewritten

    async def _stamp_row(
        self, extents: Extents, row: int, offset: int, raw: dict[int, tuple[bytes, bytes]],
        full: dict[int, bytes],
    ) -> int:
        """Rewrite every fragment of a row (`full`: index -> contents) with entries of one
        new write number; a block stays "never written" only where every fragment said so
        and it is zeros. Returns the blocks rewritten."""
        seq = self.pool.next_seq()
        flags = [unwritten_flags(raw[index][1]) for index in sorted(raw)]
        unwritten = [all(column[b] for column in flags) for b in range(len(flags[0]))]
        seqs = [seq] * len(unwritten)
        for index in sorted(full):
            position = code_position(self.spec, row, index)
            entries = entries_with_seqs(full[index], seqs, unwritten)
            await self.io.write_verified(extents, position, offset, full[index], seq=seq,
                                         entries=entries)
        return len(full) * (self.spec.interleave // CSUM_BLOCK)

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
                if not await self.rewrite_row(extents, row, offset, {index: rebuilt[0]},
                                              catching_up=True, verdict=rebuilt[1]):
                    raise DeviceError(f"disk {extents[position][0]} failed while catching up")
                rewritten += unit
        self.pool.resyncing.discard(extents[position])
        return rewritten

    async def _rebuild_from_stayers(
        self, extents: Extents, row: int, index: int
    ) -> tuple[bytes, Verdict] | None:
        """Code fragment `index` of a row rebuilt only from columns on disks that never
        left (a returning disk's column may be stale for this row), as their judgment
        (`row_judge`) says; None if they cannot rebuild it with confidence."""
        spec = self.spec
        offset = row_start(spec, row)
        stayers = [
            other for other in range(spec.width)
            if other != index and self.pool.disks[
                extents[code_position(spec, row, other)][0]].record.state != "resyncing"
        ]
        found = await self.read_row(extents, row, offset, offset + spec.interleave, stayers)
        verdict = judge_row(self.codec, found.raw, spec.width)
        if not verdict.ok or len(verdict.trusted) < spec.columns:
            return None
        return self.codec.reconstruct(verdict.trusted, [index])[index], verdict
