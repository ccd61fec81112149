"""Extent I/O: whole 4 KiB blocks of a volume's extents, each with its checksum entry.

Reads come back with their entries (unverified from `read_raw`, checked from
`read_checked`); writes put data and entries down in one device request. Every device call
goes through `Pool.disk_io`: a transient error is retried, and a disk that does not answer
within the I/O timeout is failed. A write a disk refuses fails it, durably, before the
write returns. A volume write's extent writes go to io_uring as one batch with one wait.

The hot path: when a block range and its entries are both in memory (the checksum page
cache, the page cache) a read is served with no device await at all (`cached_blocks`).
"""

import enum
import logging
from collections.abc import Iterable

import trio

from blockspace.disks import uring
from blockspace.disks.devices import Device
from blockspace.disks.io_errors import io_error_line
from blockspace.errors import DeviceError, HostSpaceError, SlabUnmapped
from blockspace.geometry.layouts import ExtentWrite
from blockspace.ondisk.checksums import ENTRY_SIZE, bad_blocks, block_runs, entries_for
from blockspace.ondisk.metadata import VolumeRecord
from blockspace.pool.checksum_store import Patches
from blockspace.pool.pool import Pool
from blockspace.volume.concurrency import bind, run_all
from blockspace.volume.pieces import BLOCK

log = logging.getLogger(__name__)

Extents = list[tuple[int, int]]  # a slab's (disk id, extent) per position
IO_ATTEMPTS = 3  # a transient device error is retried this often before the disk is failed
INLINE_READS_PER_YIELD = 16  # reads served at once from the page cache between two yields
Staged = tuple[int, Device, int, Patches, uring.Chain]  # an extent write in an io_uring batch


class Fault(enum.Enum):
    """Why an extent read gave no data."""

    MISSING = "missing"  # disk absent or out of service
    UNREADABLE = "unreadable"  # the read failed (a bad sector?): rewriting may fix it
    CORRUPT = "corrupt"  # read fine, but a block failed its checksum


class ExtentIO:
    """The extent primitives of one volume: verified, retried, bounded in time."""

    def __init__(self, pool: Pool, record: VolumeRecord) -> None:
        self.pool = pool
        self.record = record
        self._inline_reads = 0  # reads served at once from the page cache

    @property
    def name(self) -> str:
        return self.record.name

    def current_extents(self, slab: int) -> Extents:
        """The slab's extents as the map says now. Taken again once the row locks are held:
        a move may have switched the map while the caller waited for them, or a discard
        unmapped the slab (SlabUnmapped)."""
        extents = self.record.slabs.get(slab)
        if extents is None:
            raise SlabUnmapped(f"volume {self.record.name!r}: slab {slab} was unmapped")
        return extents

    # ---- no await: what is in memory -------------------------------------------------

    def cached_blocks(
        self, device: Device, disk_id: int, extent: int, start: int, end: int
    ) -> tuple[bytes, bytes] | None:
        """Data and entries of extent blocks [start, end), unverified, if both are in
        memory (the checksum page cache, the page cache); None otherwise. No await."""
        entries = self.pool.checksums.read_cached(
            disk_id, extent, start // BLOCK, (end - start) // BLOCK)
        if entries is None:
            return None
        data = device.read_now(self.pool.extent_offset(disk_id, extent) + start, end - start)
        return None if data is None else (data, entries)

    def extent_now(self, extents: Extents, position: int, start: int, end: int) -> bytes | None:
        """Extent blocks [start, end), verified, if entries and data are in memory; None
        otherwise (the disk is out, not cached, or a block fails: the careful path looks)."""
        disk_id, extent = extents[position]
        device = self.pool.extent_device(disk_id, extent)
        cached = self.cached_blocks(device, disk_id, extent, start, end) if device else None
        if cached is None or bad_blocks(*cached):
            return None
        return cached[0]

    async def inline_checkpoint(self) -> None:
        """After a read served at once: still a cancellation point, and a scheduling point
        now and then, so a scrub over cached data cannot starve the requests being served."""
        self._inline_reads += 1
        if self._inline_reads % INLINE_READS_PER_YIELD:
            await trio.lowlevel.checkpoint_if_cancelled()
        else:
            await trio.lowlevel.checkpoint()

    # ---- reads --------------------------------------------------------------------------

    async def read_raw(
        self, extents: Extents, position: int, start: int, end: int
    ) -> tuple[bytes, bytes] | Fault:
        """Data and entries of extent blocks [start, end), unverified."""
        disk_id, extent = extents[position]
        device = self.pool.extent_device(disk_id, extent)
        if device is None:
            return Fault.MISSING
        # The hot path: entries cached and data in the page cache (a timeout scope and a
        # device await per call cost more than the read itself).
        cached = self.cached_blocks(device, disk_id, extent, start, end)
        if cached is not None:
            await self.inline_checkpoint()
            return cached
        disk = self.pool.disks[disk_id]
        first, count = start // BLOCK, (end - start) // BLOCK
        offset = self.pool.extent_offset(disk_id, extent) + start
        entries_at = self.pool.checksum_offset(disk_id, extent) + first * ENTRY_SIZE
        what, at, length = "checksum read", entries_at, count * ENTRY_SIZE
        try:
            entries = await self.pool.disk_io(
                disk, what,
                lambda _: self.pool.checksums.read(disk_id, extent, first, count),
                device=device, attempts=IO_ATTEMPTS, fail_on_timeout=True,
                offset=at, length=length)
            what, at, length = "read", offset, end - start
            data = await self.pool.disk_io(
                disk, what, lambda device: device.read(offset, end - start),
                device=device, attempts=IO_ATTEMPTS, fail_on_timeout=True,
                offset=at, length=length)
        except DeviceError as error:
            self.pool.count_device_error(disk_id, "read")
            log.warning("%s; served from redundancy where there is any",
                        io_error_line(disk_id, f"{what} (extent {extent})", at, length, error),
                        extra={"ratelimit_key": ("io-error", disk_id, "read")})
            return Fault.UNREADABLE if self.pool.extent_device(disk_id, extent) else Fault.MISSING
        return data, entries

    async def read_checked(
        self, extents: Extents, position: int, start: int, end: int
    ) -> tuple[bytes, bytes] | Fault:
        """Blocks [start, end) of the extent at `position` and their checksum entries,
        each block checked against its entry."""
        raw = await self.read_raw(extents, position, start, end)
        if isinstance(raw, Fault):
            return raw
        data, entries = raw
        bad = bad_blocks(data, entries)
        if bad:
            # Not counted against the disk here: an unlocked read racing a write can see new
            # entries with old data. The careful path re-reads under the row locks and
            # counts what is really bad (the mirror's merge, the parity's fragments).
            disk_id, extent = extents[position]
            log.debug("checksum mismatch on disk %d, extent %d, blocks %s",
                      disk_id, extent, [start // BLOCK + b for b in bad][:8])
            return Fault.CORRUPT
        return raw

    async def read_verified(
        self, extents: Extents, position: int, start: int, end: int
    ) -> bytes | Fault:
        result = await self.read_checked(extents, position, start, end)
        return result if isinstance(result, Fault) else result[0]

    async def entries_by_position(
        self, extents: Extents, positions: Iterable[int], start: int, end: int,
        *, catching_up: bool = False,
    ) -> dict[int, bytes]:
        """Checksum entries of blocks [start, end) of each extent position whose disk is in
        service and answers; `catching_up`: also of a returning disk's extents that await
        their catch-up (repair/readmit.py)."""
        found = {}
        first, count = start // BLOCK, (end - start) // BLOCK
        for position in positions:
            entries = await self._entries(*extents[position], first, count, catching_up)
            if entries is not None:
                found[position] = entries
        return found

    async def _entries(
        self, disk_id: int, extent: int, first: int, count: int, catching_up: bool
    ) -> bytes | None:
        device = self.pool.extent_device(disk_id, extent, resync=catching_up)
        if device is None:
            return None
        try:  # bounded like every device call: a disk that hangs here is failed too
            return await self.pool.disk_io(
                self.pool.disks[disk_id], "checksum read",
                lambda _: self.pool.checksums.read(disk_id, extent, first, count),
                device=device, attempts=IO_ATTEMPTS, fail_on_timeout=True)
        except DeviceError:
            self.pool.count_device_error(disk_id, "read")
            return None

    # ---- writes -------------------------------------------------------------------------

    async def write_verified(
        self, extents: Extents, position: int, start: int, data: bytes | memoryview,
        *, seq: int = 0, entries: bytes | None = None, catching_up: bool = False,
        host_full: list[HostSpaceError] | None = None,
    ) -> bool:
        """Write whole blocks and their checksum entries (computed for write `seq`, or the
        given ones when copying); False if the disk is out (a failed write takes the disk
        out of service, durably, before returning) or its host file system had no room
        (the disk stays in service; the error is added to `host_full`). `catching_up`:
        also to a returning disk's extent that awaits its catch-up."""
        disk_id, extent = extents[position]
        device = self.pool.extent_device(disk_id, extent, resync=catching_up)
        if device is None:
            return False
        if entries is None:
            entries = entries_for(data, seq)
        offset = self.pool.extent_offset(disk_id, extent) + start
        try:
            # Data, then its checksum entries, in one device request (one worker round trip).
            # Shielded: a write cancelled with its request (a sibling column failed, the
            # kernel interrupted it) could be dropped before a worker took it, after the
            # checksum cache was patched, leaving cache and disk disagreeing. It finishes,
            # or fails by the I/O timeout (Pool.disk_io).
            await self.pool.disk_io(
                self.pool.disks[disk_id], "write",
                lambda _: self.pool.checksums.write(disk_id, extent, start // BLOCK, entries,
                                                    data=(offset, data)),
                device=device, attempts=IO_ATTEMPTS, shield=True, fail_on_timeout=True,
                offset=offset, length=len(data))
        except HostSpaceError as error:
            self.pool.note_host_full(disk_id, error)
            if host_full is not None:
                host_full.append(error)
            return False
        except DeviceError as error:
            log.error("%s; the disk is taken out of service",
                      io_error_line(disk_id, f"write (extent {extent})", offset, len(data),
                                    error))
            self.pool.count_device_error(disk_id, "write")
            await self.pool.mark_failed(disk_id, str(error))
            return False
        self.pool.note_written(disk_id)
        return True

    async def write_runs(
        self, extents: Extents, position: int, start: int, blocks: list[int],
        data: bytes | bytearray, entries: bytes | bytearray,
    ) -> int:
        """Rewrite some blocks of an extent (runs of consecutive ones) with given contents;
        returns blocks written."""
        written = 0
        for first, count in block_runs(blocks):
            lo, hi = first * BLOCK, (first + count) * BLOCK
            if await self.write_verified(
                extents, position, start + lo, bytes(data[lo:hi]),
                entries=bytes(entries[first * ENTRY_SIZE : (first + count) * ENTRY_SIZE]),
            ):
                written += count
        return written

    async def write_extents(
        self, extents: Extents, writes: list[ExtentWrite], seq: int
    ) -> list[bool]:
        """Write each (extent position, offset, payload) with its checksum entries for write
        `seq`, all at once; True where written (False: the disk is out, or was just taken
        out). Writes to disks that take io_uring go out in one submission with one wait;
        the others, and any that did not complete cleanly that way, go through
        `write_verified` (retries; a real error fails the disk).

        HostSpaceError once all are done if a disk still in service had no room on its
        host file system for its part: the write is not on every copy, so it is not
        acknowledged (the caller marks its regions for resync, see Volume)."""
        written = [False] * len(writes)
        careful: list[int] = []
        staged: list[Staged] = []
        entries_of: dict[int, bytes] = {}  # copies of one payload share its entries
        for index, (position, offset, payload) in enumerate(writes):
            disk_id, extent = extents[position]
            device = self.pool.extent_device(disk_id, extent)
            if device is None:
                continue
            entries = entries_of.get(id(payload))
            if entries is None:
                entries = entries_of[id(payload)] = entries_for(payload, seq)
            first_block = offset // BLOCK
            chain = device.ring_chain([
                (self.pool.extent_offset(disk_id, extent) + offset, payload),
                (self.pool.checksums.entries_at(disk_id, extent, first_block), entries),
            ])
            if chain is None:
                careful.append(index)
                continue
            _, patches = self.pool.checksums.begin_write(disk_id, extent, first_block, entries)
            staged.append((index, device, disk_id, patches, chain))
        if staged:
            careful += await self._run_batch(staged, written)

        host_full: list[HostSpaceError] = []

        async def write_one(index: int) -> None:
            position, offset, payload = writes[index]
            written[index] = await self.write_verified(
                extents, position, offset, payload, entries=entries_of[id(payload)],
                host_full=host_full)

        await run_all([bind(write_one, index) for index in careful])
        if host_full:
            raise HostSpaceError(f"volume {self.name!r}: {host_full[0]}")
        return written

    async def _run_batch(self, staged: list[Staged], written: list[bool]) -> list[int]:
        """Submit staged extent writes as one io_uring batch and wait (shielded, like every
        write, and bounded by the I/O timeout). Marks `written`; returns the indexes to
        redo carefully."""
        ring = uring.current()
        batch = uring.Batch([chain for *_, chain in staged])
        timeout = self.pool.io_timeout
        try:
            with trio.CancelScope(deadline=trio.current_time() + timeout, shield=True):
                assert ring is not None  # ring_chain gave chains, so this run has a ring
                await ring.run(batch)
        except OSError:  # the ring refused the batch: not a disk error
            for *_, patches, _ in staged:
                self.pool.checksums.end_write(patches)
            return [index for index, *_ in staged]
        redo = []
        for number, (index, device, disk_id, patches, chain) in enumerate(staged):
            self.pool.checksums.end_write(patches)
            results = batch.chain_results(number)
            if results is None:  # no answer in time: as Pool.disk_io would, the disk goes
                self.pool.count_device_error(disk_id, "write")
                with trio.CancelScope(shield=True):
                    await self.pool.mark_failed(
                        disk_id, f"no answer to a write within {timeout:g}s")
            elif uring.check(results, [view.nbytes for _, view in chain.pieces]) is None:
                device.ring_written(chain)
                self.pool.note_written(disk_id)
                written[index] = True
            else:  # failed or short: the careful path retries, and fails the disk if it must
                redo.append(index)
        return redo
