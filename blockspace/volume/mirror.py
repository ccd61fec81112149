"""Simple and mirror volumes: each data column stored `copies` times (once for simple).

Every repair of copies is one routine: read every copy of a column range, choose block by
block the newest copy that verifies (`checksums.choose_blocks`), and rewrite the copies
that are bad, older or different (`Merge`). What differs between its users is only what a
block no copy verifies means:
- a read's self-heal (`merge_copies`): the data is lost, Unrecoverable;
- a scrub (`check`): reported as a volume byte range, the rest repaired;
- a region resync after an unclean stop (`make_consistent`): a write torn between data
  and checksum; its data (old or new, both legal for a write never acknowledged) is kept
  and given a matching checksum.
"""

import logging
from dataclasses import dataclass

from blockspace.errors import DeviceError, Unrecoverable
from blockspace.geometry.layouts import ExtentWrite, LayoutSpec, Piece, data_positions
from blockspace.ondisk.checksums import (
    CSUM_BLOCK,
    ENTRY_SIZE,
    Choice,
    choose_blocks,
    entries_for,
    entry_at,
    entry_seq,
    newer_elsewhere,
)
from blockspace.volume.cached_reads import CachedReads
from blockspace.volume.extent_io import ExtentIO, Extents, Fault
from blockspace.volume.pieces import BLOCK, gather
from blockspace.volume.redundancy import Check, Counters
from blockspace.volume.row_locks import RowLocks, column_rows

log = logging.getLogger(__name__)

CATCH_UP_CHUNK = 1 << 20  # extent bytes whose entries a catch-up compares per step


@dataclass
class Merge:
    """Every copy of a column range compared: what each copy gave, and the choice."""

    start: int  # extent offset of the range
    copies: dict[int, tuple[bytes, bytes]]  # position -> (data, entries) as read
    unreadable: list[int]  # positions whose read failed (disks that are out: in neither)
    choice: Choice

    def rewrite_unreadable(self) -> None:
        """Rewrite the copies that could not be read, every block that has a good copy:
        a drive remaps a bad sector when it is written again."""
        lost = set(self.choice.unrecoverable)
        blocks = len(self.choice.data) // CSUM_BLOCK
        for position in self.unreadable:
            self.choice.repairs[position] = [i for i in range(blocks) if i not in lost]

    def keep_torn_blocks(self) -> None:
        """A block no copy verifies was torn between data and checksum by an unclean stop:
        the first copy's data is kept, with a checksum that matches it, on every copy."""
        first = self.copies[min(self.copies)][0]
        choice = self.choice
        for index in choice.unrecoverable:
            lo, hi = index * CSUM_BLOCK, (index + 1) * CSUM_BLOCK
            seq = max(entry_seq(entry_at(entries, index)) for _, entries in self.copies.values())
            choice.data[lo:hi] = first[lo:hi]
            choice.entries[index * ENTRY_SIZE : (index + 1) * ENTRY_SIZE] = entries_for(
                first[lo:hi], seq
            )
            for position in self.copies:
                choice.repairs.setdefault(position, []).append(index)


class Mirror:
    """The `Redundancy` of simple and mirror volumes."""

    def __init__(
        self, io: ExtentIO, spec: LayoutSpec, locks: RowLocks, cached: CachedReads,
        counters: Counters,
    ) -> None:
        self.io = io
        self.pool = io.pool
        self.spec = spec
        self.locks = locks
        self.cached = cached
        self.counters = counters

    # ---- the I/O path -----------------------------------------------------------------

    def read_now(self, extents: Extents, pieces: list[Piece], buffer: bytearray) -> bool:
        return self.cached.columns_now(extents, pieces, buffer)

    async def read_column(
        self, slab: int, extents: Extents, row: int, column: int, start: int, end: int,
        *, locked: bool,
    ) -> bytes:
        """The first copy that verifies and is not older than the other copies' entries
        say. Anything else (a bad, unreadable or stale copy) goes to the careful path under
        the row locks, which compares every copy and repairs."""
        positions = data_positions(self.spec, row, column)
        if not locked:
            for position in positions:
                result = await self.io.read_checked(extents, position, start, end)
                if result is Fault.MISSING:
                    self.counters.degraded_reads += 1
                    continue  # nothing to repair on a disk that is out
                if isinstance(result, tuple):
                    data, entries = result
                    others = await self.io.entries_by_position(
                        extents, [p for p in positions if p != position], start, end)
                    if not newer_elsewhere(entries, list(others.values())):
                        return data
                break
            async with self.locks.hold(column_rows(self.spec, slab, start, end)):
                extents = self.io.current_extents(slab)
                return (await self.merge_copies(slab, extents, column, start, end))[0]
        return (await self.merge_copies(slab, extents, column, start, end))[0]

    async def write_pieces(
        self, slab: int, extents: Extents, pieces: list[Piece], data: memoryview, seq: int
    ) -> None:
        writes: list[ExtentWrite] = []
        for piece in pieces:
            payload = gather(self.spec, data, piece)
            for position in data_positions(self.spec, piece.row, piece.column):
                writes.append((position, piece.column_offset, payload))
        written = await self.io.write_extents(extents, writes, seq)
        copies = self.spec.copies  # writes holds each piece's copies in turn
        for number, piece in enumerate(pieces):
            if not any(written[number * copies : (number + 1) * copies]):
                raise Unrecoverable(
                    f"volume {self.io.name!r}: no copy of slab {slab} at {piece.column_offset} "
                    "could be written"
                )

    # ---- copies compared and repaired: the one routine --------------------------------

    async def read_copies_raw(
        self, extents: Extents, column: int, start: int, end: int
    ) -> tuple[dict[int, tuple[bytes, bytes]], list[int]]:
        """Every copy of a column range, unverified: ({position: (data, entries)}, positions
        whose read failed). Disks that are out are left out of both."""
        copies: dict[int, tuple[bytes, bytes]] = {}
        unreadable = []
        for position in sorted(data_positions(self.spec, 0, column)):
            raw = await self.io.read_raw(extents, position, start, end)
            if isinstance(raw, tuple):
                copies[position] = raw
            elif raw is Fault.UNREADABLE:
                unreadable.append(position)
        return copies, unreadable

    async def compare(self, extents: Extents, column: int, start: int, end: int) -> Merge | None:
        """Read every copy of a column range and choose; None if no copy could be read."""
        copies, unreadable = await self.read_copies_raw(extents, column, start, end)
        if not copies:
            return None
        return Merge(start, copies, unreadable, choose_blocks(copies))

    async def rewrite(self, extents: Extents, merge: Merge) -> dict[int, int]:
        """Rewrite the blocks the choice lists for repair on each copy, from the chosen
        data and entries; returns blocks written per position."""
        choice = merge.choice
        written = {}
        for position, indexes in sorted(choice.repairs.items()):
            written[position] = await self.io.write_runs(
                extents, position, merge.start, sorted(set(indexes)), choice.data,
                choice.entries)
        return written

    async def count_failed(
        self, extents: Extents, merge: Merge, *, warn: bool, behind: bool = True
    ) -> None:
        """Blocks that failed their checksum count against their disks; with `behind`, so
        do blocks of a copy behind the chosen one (zeroed, or a lost write): damage in
        service, though not in a returning disk's catch-up, where it is what it missed."""
        counts = dict(merge.choice.failed)
        if behind:
            for position, count in merge.choice.behind.items():
                counts[position] = counts.get(position, 0) + count
        for position, count in sorted(counts.items()):
            disk_id, extent = extents[position]
            if warn:
                log.warning("checksum mismatch on disk %d, extent %d: %d blocks (%d failing, "
                            "%d behind the other copies)", disk_id, extent, count,
                            merge.choice.failed.get(position, 0),
                            count - merge.choice.failed.get(position, 0))
            await self.pool.count_checksum_errors(disk_id, count)

    async def merge_copies(
        self, slab: int, extents: Extents, column: int, start: int, end: int,
        *, repair: bool = True, count_behind: bool = True,
    ) -> tuple[bytes, bytes, Choice]:
        """A read's self-heal: compare every copy of a column range block by block, take
        the newest that verifies, and (with `repair`) rewrite the others. Caller holds the
        row locks. Unrecoverable if some block has no good copy."""
        merge = await self.compare(extents, column, start, end)
        if merge is None:
            raise Unrecoverable(
                f"volume {self.io.name!r}: no readable copy of slab {slab} at extent offset "
                f"{start}"
            )
        choice = merge.choice
        await self.count_failed(extents, merge, warn=True, behind=count_behind)
        merge.rewrite_unreadable()
        if choice.unrecoverable:
            first = start + choice.unrecoverable[0] * BLOCK
            raise Unrecoverable(
                f"volume {self.io.name!r}: no good copy of slab {slab} at extent offset {first}"
            )
        if repair:
            for position, healed in (await self.rewrite(extents, merge)).items():
                if healed:
                    self.counters.healed_blocks += healed
                    log.info("healed %d blocks of slab %d on position %d", healed, slab, position)
        return bytes(choice.data), bytes(choice.entries), choice

    # ---- the repairs ------------------------------------------------------------------

    async def extent_contents(
        self, slab: int, extents: Extents, position: int, start: int, end: int
    ) -> tuple[bytes, bytes]:
        """The column's merged copies; entries are kept (their write numbers tell copies
        apart)."""
        data, entries, _ = await self.merge_copies(slab, extents, position // self.spec.copies,
                                                   start, end)
        return data, entries

    async def check(
        self, slab: int, extents: Extents, start: int, end: int, *, repair: bool
    ) -> Check:
        """Every copy's blocks are checked against their checksums; copies that fail (or
        differ from the chosen one) are rewritten from it; a block with no good copy is
        unrecoverable."""
        found = Check()
        blocks = (end - start) // CSUM_BLOCK
        for column in range(self.spec.columns):
            merge = await self.compare(extents, column, start, end)
            if merge is None:
                continue
            choice = merge.choice
            found.blocks_checked += blocks * len(merge.copies)
            found.bytes_checked += (end - start) * len(merge.copies)
            found.checksum_errors += choice.checksum_errors + choice.lost
            found.mismatches += choice.mismatches + choice.stale
            await self.count_failed(extents, merge, warn=False)
            for index in choice.unrecoverable:
                found.unrecoverable.append((column, start + index * CSUM_BLOCK, CSUM_BLOCK))
            merge.rewrite_unreadable()
            if repair:
                found.repaired_blocks += sum((await self.rewrite(extents, merge)).values())
        return found

    async def make_consistent(self, extents: Extents, start: int, end: int) -> int:
        """Per block, the newest copy whose checksum verifies wins (a block none verifies:
        the first readable copy, see `Merge.keep_torn_blocks`); every copy and checksum is
        made equal to it. Mismatches here are torn writes, not disk errors: not counted."""
        rewritten = 0
        for column in range(self.spec.columns):
            merge = await self.compare(extents, column, start, end)
            if merge is None:
                continue
            merge.keep_torn_blocks()
            rewritten += sum((await self.rewrite(extents, merge)).values())
        return rewritten

    async def catch_up(self, slab: int, extents: Extents, position: int, since: int) -> int:
        """Compare the returning copy's checksum entries with the other copies' (16 bytes
        per 4 KiB: the comparison reads 0.4% of the data) and merge only the ranges whose
        entries differ, the newest valid copy winning, as a read's self-heal would. The
        copy takes part in the merge, so it leaves `Pool.resyncing` first (and comes back
        to it if the merge fails): every entry it holds is checked against the others', and
        a read of it before its range is merged finds the newer write elsewhere."""
        extent = extents[position]
        self.pool.resyncing.discard(extent)
        try:
            return await self._merge_differences(slab, extents, position)
        except BaseException:
            self.pool.resyncing.add(extent)
            raise

    async def _merge_differences(self, slab: int, extents: Extents, position: int) -> int:
        if self.spec.copies == 1:
            return 0  # its only copy: nothing to compare it with
        column = position // self.spec.copies
        positions = data_positions(self.spec, 0, column)
        rewritten = 0
        for start in range(0, self.pool.slab_size, CATCH_UP_CHUNK):
            end = start + CATCH_UP_CHUNK
            entries = await self.io.entries_by_position(extents, positions, start, end,
                                                        catching_up=True)
            if position not in entries:
                raise DeviceError(f"disk {extents[position][0]} could not be read while "
                                  "catching up")
            if len(set(entries.values())) == 1:
                continue  # every copy carries the same writes
            _, _, choice = await self.merge_copies(slab, extents, column, start, end,
                                                   count_behind=False)
            rewritten += len(choice.repairs.get(position, ())) * CSUM_BLOCK
        return rewritten
