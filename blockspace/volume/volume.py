"""A volume: byte offsets -> slabs -> layout -> concurrent, checksummed device I/O.

Requests are split per slab, then per row and data column by `layouts.split`; the pieces
of one request run concurrently. Every extent read is verified block by block against its
checksum entries; a bad or unreadable copy is served from another copy or rebuilt from
parity, and rewritten in place (self-heal). Writes hold the locks of the rows they touch,
so a parity read-modify-write, a partial-block write, a heal or two mirror writes to one
row never interleave. Device I/O below works in whole 4 KiB blocks.
"""

import enum
import logging
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import TypeVar

import trio

from blockspace.disks import uring
from blockspace.disks.devices import Device
from blockspace.errors import DeviceError, InvalidInput, Unrecoverable
from blockspace.geometry.erasure import ErasureCodec
from blockspace.geometry.layouts import (
    ExtentWrite,
    LayoutSpec,
    Piece,
    coalesce,
    code_position,
    data_positions,
    parity_positions,
    row_start,
    segments,
    split,
    unit_range,
)
from blockspace.ondisk.checksums import (
    CSUM_BLOCK,
    ENTRY_SIZE,
    Choice,
    bad_blocks,
    block_runs,
    choose_blocks,
    entries_for,
    newer_elsewhere,
)
from blockspace.ondisk.metadata import VolumeRecord
from blockspace.pool.checksum_store import Patches
from blockspace.pool.intent import region_size, volume_key
from blockspace.pool.pool import Pool
from blockspace.volume.concurrency import bind, run_all
from blockspace.volume.region_resync import resync_region

log = logging.getLogger(__name__)

Extents = list[tuple[int, int]]
BLOCK = CSUM_BLOCK
IO_ATTEMPTS = 3  # a transient device error is retried this often before the disk is failed
T = TypeVar("T")
INLINE_READS_PER_YIELD = 16  # reads served at once from the page cache between two yields


def align_down(value: int) -> int:
    return value - value % BLOCK


def align_up(value: int) -> int:
    return -(-value // BLOCK) * BLOCK


class Fault(enum.Enum):
    """Why an extent read gave no data."""

    MISSING = "missing"  # disk absent or out of service
    UNREADABLE = "unreadable"  # the read failed (a bad sector?): rewriting may fix it
    CORRUPT = "corrupt"  # read fine, but a block failed its checksum


class RowLocks:
    """A fixed array of locks that rows hash onto: bounded memory, whatever the volume size.
    Collisions only serialize two unrelated rows; locks are taken in index order."""

    def __init__(self, count: int = 4096) -> None:
        self._locks = [trio.Lock() for _ in range(count)]

    def hold(self, keys: Iterable[tuple[int, int]]) -> "HeldRows":
        """`async with locks.hold(keys):` the rows' locks, held for the block."""
        return HeldRows([self._locks[i] for i in sorted({hash(k) % len(self._locks)
                                                         for k in keys})])


class HeldRows:
    """The context manager of `RowLocks.hold`, written out as a class: it is on the path of
    every write, where a generator-based one costs a few microseconds more."""

    __slots__ = ("_locks", "_taken")

    def __init__(self, locks: list[trio.Lock]) -> None:
        self._locks = locks
        self._taken: list[trio.Lock] = []

    async def __aenter__(self) -> None:
        waited = False
        try:
            for lock in self._locks:
                try:  # uncontended, the usual case: no trip through the scheduler
                    lock.acquire_nowait()
                except trio.WouldBlock:
                    await lock.acquire()
                    waited = True
                self._taken.append(lock)
            if not waited:
                await trio.lowlevel.checkpoint_if_cancelled()
        except BaseException:
            self._release()
            raise

    async def __aexit__(self, *_: object) -> None:
        self._release()

    def _release(self) -> None:
        while self._taken:
            self._taken.pop().release()


@dataclass(frozen=True)
class VolumeStats:
    reads: int
    writes: int
    bytes_read: int
    bytes_written: int
    degraded_reads: int
    healed_blocks: int
    allocated_slabs: int


class Volume:
    def __init__(self, pool: Pool, record: VolumeRecord) -> None:
        self.pool = pool
        self.record = record
        self.spec = LayoutSpec.from_dict(record.layout)
        self.slab_data_size = self.spec.slab_data_size(pool.slab_size)
        self.codec: ErasureCodec | None = None
        if self.spec.kind == "parity":
            self.codec = ErasureCodec(self.spec.columns, self.spec.parity, record.ec_type)
        self._row_locks = RowLocks()
        self._allocation_lock = trio.Lock()
        self.key = volume_key(record.uuid)
        # Write-intent regions, in extent bytes: a whole number of rows.
        self.region_size = region_size(self.spec.interleave)
        self.pending_resync = {(s, r) for k, s, r in pool.recovering if k == self.key}
        self._reads = self._writes = self._bytes_read = self._bytes_written = 0
        self._degraded_reads = self._healed_blocks = 0
        self._inline_reads = 0  # column reads served at once from the page cache

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
            self._healed_blocks,
            len(self.record.slabs),
        )

    # ---- public I/O -----------------------------------------------------------------

    async def read(self, offset: int, length: int) -> bytes | bytearray:
        self._check_range(offset, length)
        fast = self._read_now(offset, length)
        if fast is not None:
            await self._inline_checkpoint()
            return fast
        out = bytearray(length)
        view = memoryview(out)
        jobs = [
            bind(self._read_slab, slab, slab_offset, view[start : start + count])
            for slab, slab_offset, start, count in self._slab_ranges(offset, length)
        ]
        await run_all(jobs)
        self._reads += 1
        self._bytes_read += length
        return out

    def _read_now(self, offset: int, length: int) -> bytes | bytearray | None:
        """The hot path of a read, with no await: every column piece of one slab in memory
        (checksum entries and data), verified, and no other copy with a newer write. None
        for anything else (a disk out, rot, a resync pending, data not cached): the careful
        path below handles it."""
        if self.pending_resync:
            return None
        slab, slab_offset = divmod(offset, self.slab_data_size)
        if slab_offset + length > self.slab_data_size:
            return None
        extents = self.record.slabs.get(slab)
        if extents is None:
            return None
        pieces = split(self.spec, slab_offset, length)
        if len(pieces) == 1:
            found = self._piece_now(extents, pieces[0])
            if found is None:
                return None
            data, skip = found
            result: bytes | bytearray = (
                data if skip == 0 and len(data) == length else data[skip : skip + length])
        else:  # the reply goes out from this buffer as it is: no copy
            buffer = bytearray(length)
            filled = (self._parity_now(extents, pieces, buffer) if self.spec.kind == "parity"
                      else self._columns_now(extents, pieces, memoryview(buffer)))
            if not filled:
                return None
            result = buffer
        self._reads += 1
        self._bytes_read += length
        return result

    def _piece_now(self, extents: Extents, piece: Piece) -> tuple[bytes, int] | None:
        """The whole blocks holding one piece, verified, and where the piece starts in them;
        None unless that can be had without waiting (see `_read_now`)."""
        start = align_down(piece.column_offset)
        end = align_up(piece.column_offset + piece.length)
        source = self._source_now(extents, piece, start, end)
        if source is None:
            return None
        device, at, entries = source
        data = device.read_now(at, end - start)
        if data is None or bad_blocks(data, entries):
            return None
        return data, piece.column_offset - start

    def _source_now(
        self, extents: Extents, piece: Piece, start: int, end: int
    ) -> tuple[Device, int, bytes] | None:
        """Where to read blocks [start, end) of a simple or mirror piece at once: the
        preferred copy's device, the byte offset there, and the blocks' checksum entries.
        None unless the entries are cached and no other copy carries a newer write."""
        positions = data_positions(self.spec, piece.row, piece.column)
        disk_id, extent = extents[positions[0]]
        device = self.pool.extent_device(disk_id, extent)
        if device is None:
            return None
        first, count = start // BLOCK, (end - start) // BLOCK
        entries = self.pool.checksums.read_cached(disk_id, extent, first, count)
        if entries is None:
            return None
        for other in positions[1:]:  # mirror: no other copy may carry a newer write
            other_disk, other_extent = extents[other]
            if self.pool.extent_device(other_disk, other_extent) is None:
                return None  # degraded: counted and handled on the careful path
            theirs = self.pool.checksums.read_cached(other_disk, other_extent, first, count)
            if theirs is None or (theirs != entries and newer_elsewhere(entries, [theirs])):
                return None
        return device, self.pool.extent_offset(disk_id, extent) + start, entries

    def _columns_now(self, extents: Extents, pieces: list[Piece], out: memoryview) -> bool:
        """`_read_now` for simple and mirror pieces of several columns, one read each. A
        piece of whole blocks is read straight into its places in `out` and verified there;
        others (a partial block at an end) through a buffer of their own. The pieces read
        in place are verified together, with one call: the per-call cost is paid once."""
        read: list[memoryview] = []
        entries_read: list[bytes] = []
        for piece in pieces:
            if piece.column_offset % BLOCK or piece.length % BLOCK:
                found = self._piece_now(extents, piece)
                if found is None:
                    return False
                self._scatter(out, piece, *found)
                continue
            end = piece.column_offset + piece.length
            source = self._source_now(extents, piece, piece.column_offset, end)
            if source is None:
                return False
            device, at, entries = source
            places = [out[buf : buf + count] for buf, _, count in segments(self.spec, piece)]
            if not device.read_now_into(at, places):
                return False
            read += places
            entries_read.append(entries)
        return not read or not bad_blocks(read, b"".join(entries_read))

    def _parity_now(self, extents: Extents, pieces: list[Piece], out: bytearray) -> bool:
        """`_read_now` for parity pieces in several rows: each disk's pieces lie in
        consecutive rows of its extent, so one read per disk covers them (with a parity
        unit in between, if any: read and verified too, and not used). False unless every
        span is in memory and verifies."""
        spans: dict[int, tuple[int, int]] = {}
        for piece in pieces:
            position = code_position(self.spec, piece.row, piece.column)
            start = align_down(piece.column_offset)
            end = align_up(piece.column_offset + piece.length)
            span = spans.get(position)
            spans[position] = (start, end) if span is None else (min(span[0], start),
                                                                  max(span[1], end))
        blocks: dict[int, tuple[bytes, int]] = {}
        for position, (start, end) in spans.items():
            data = self._extent_now(extents, position, start, end)
            if data is None:
                return False
            blocks[position] = (data, start)
        for piece in pieces:
            data, start = blocks[code_position(self.spec, piece.row, piece.column)]
            self._scatter(out, piece, data, piece.column_offset - start)
        return True

    def _gather(self, data: memoryview, piece: Piece) -> memoryview | bytes:
        """A piece's bytes out of the request buffer, in disk order."""
        parts = segments(self.spec, piece)
        if len(parts) == 1:
            return data[piece.buf_offset : piece.buf_offset + piece.length]
        return b"".join([data[buf : buf + count] for buf, _, count in parts])

    def _scatter(self, out: bytearray | memoryview, piece: Piece, blocks: bytes,
                 skip: int) -> None:
        """Lay a piece read from disk (starting `skip` bytes into `blocks`) into the request
        buffer."""
        source = memoryview(blocks)
        for buf, at, count in segments(self.spec, piece):
            out[buf : buf + count] = source[skip + at : skip + at + count]

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

    # ---- resync after an unclean stop ----------------------------------------------------

    async def resync_pending(self) -> int:
        """Resync every region the last unclean stop left dirty; returns regions done."""
        done = 0
        for slab, region in sorted(self.pending_resync):
            await self.resync_region(slab, region)
            done += 1
        return done

    async def resync_region(self, slab: int, region: int) -> None:
        start = region * self.region_size
        end = min(start + self.region_size, self.pool.slab_size)
        async with self._row_locks.hold(self._column_rows(slab, start, end)):
            if (slab, region) not in self.pending_resync:
                return  # another task got here first
            extents = self.record.slabs.get(slab)
            if extents is not None:
                blocks = await resync_region(self, extents, start, end)
                if blocks:
                    log.info("volume %s: resynced slab %d region %d (%d blocks rewritten)",
                             self.name, slab, region, blocks)
            self.pending_resync.discard((slab, region))
            key = (self.key, slab, region)
            self.pool.recovering.discard(key)
            if self.pool.intent is not None:
                self.pool.intent.release(key)

    async def _resync_if_pending(self, slab: int, start: int, end: int) -> None:
        """I/O into a region still awaiting resync waits for it: nothing inconsistent is
        ever read or used for a parity read-modify-write."""
        if self.pending_resync:
            for region in self._regions(slab, start, end):
                if (slab, region) in self.pending_resync:
                    await self.resync_region(slab, region)

    def _regions(self, slab: int, start: int, end: int) -> set[int]:
        """Intent regions a slab-relative byte range [start, end) touches."""
        unit = self.spec.interleave
        return {row * unit // self.region_size for _, row in self._slab_rows(slab, start, end)}

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

    def _slab_rows(self, slab: int, start: int, end: int) -> list[tuple[int, int]]:
        """Lock keys of the rows a slab-relative byte range [start, end) touches."""
        row_bytes = self.spec.interleave * self.spec.columns
        return [(slab, row) for row in range(start // row_bytes, (end - 1) // row_bytes + 1)]

    def _column_rows(self, slab: int, start: int, end: int) -> list[tuple[int, int]]:
        """Lock keys of the rows an extent byte range [start, end) lies in."""
        unit = self.spec.interleave
        return [(slab, row) for row in range(start // unit, (end - 1) // unit + 1)]

    # ---- extent primitives: whole blocks, verified --------------------------------------

    async def _device_op(
        self, disk_id: int, what: str, op: Callable[[], Awaitable[T]], *, shield: bool = False
    ) -> T:
        """One device call with a bounded retry for transient errors and a timeout for a
        disk that stops answering (which then takes it out of service). `shield`: the call
        is not cancelled with its caller, only by the timeout."""
        timeout = self.pool.io_timeout
        for attempt in range(IO_ATTEMPTS):
            with trio.CancelScope(deadline=trio.current_time() + timeout, shield=shield) as scope:
                try:
                    return await op()
                except DeviceError:
                    if attempt + 1 == IO_ATTEMPTS:
                        raise
                    log.warning("disk %d: %s failed, retrying", disk_id, what)
                    await trio.sleep(0.01 * (attempt + 1))
                    continue
            if scope.cancelled_caught:
                reason = f"no answer to a {what} within {timeout:g}s"
                with trio.CancelScope(shield=shield):
                    await self.pool.mark_failed(disk_id, reason)
                raise DeviceError(f"disk {disk_id}: {reason}")
        raise AssertionError("unreachable")

    async def _read_checked(
        self, extents: Extents, position: int, start: int, end: int
    ) -> tuple[bytes, bytes] | Fault:
        """Blocks [start, end) of the extent at `position` and their checksum entries,
        each block checked against its entry."""
        raw = await self._read_raw(extents, position, start, end)
        if isinstance(raw, Fault):
            return raw
        data, entries = raw
        bad = bad_blocks(data, entries)
        if bad:
            # Not counted against the disk here: an unlocked read racing a write can see new
            # entries with old data. The careful path re-reads under the row locks and
            # counts what is really bad (merge_copies, _fragments).
            disk_id, extent = extents[position]
            log.debug("checksum mismatch on disk %d, extent %d, blocks %s",
                      disk_id, extent, [start // BLOCK + b for b in bad][:8])
            return Fault.CORRUPT
        return raw

    async def _read_raw(
        self, extents: Extents, position: int, start: int, end: int
    ) -> tuple[bytes, bytes] | Fault:
        """Data and entries of extent blocks [start, end), unverified."""
        disk_id, extent = extents[position]
        device = self.pool.extent_device(disk_id, extent)
        if device is None:
            return Fault.MISSING
        # The hot path: entries cached and data in the page cache (a timeout scope and a
        # device await per call cost more than the read itself).
        cached = self._cached_blocks(device, disk_id, extent, start, end)
        if cached is not None:
            await self._inline_checkpoint()
            return cached
        try:
            entries = await self._device_op(disk_id, "checksum read", lambda: (
                self.pool.checksums.read(disk_id, extent, start // BLOCK, (end - start) // BLOCK)
            ))
            offset = self.pool.extent_offset(disk_id, extent) + start
            data = await self._device_op(disk_id, "read", lambda: device.read(offset, end - start))
        except DeviceError as error:
            self.pool.disks[disk_id].errors["read"] += 1
            log.warning("read error on disk %d: %s", disk_id, error)
            return Fault.UNREADABLE if self.pool.extent_device(disk_id, extent) else Fault.MISSING
        return data, entries

    def _extent_now(self, extents: Extents, position: int, start: int, end: int) -> bytes | None:
        """Extent blocks [start, end), verified, if entries and data are in memory; None
        otherwise (the disk is out, not cached, or a block fails: the careful path looks)."""
        disk_id, extent = extents[position]
        device = self.pool.extent_device(disk_id, extent)
        cached = self._cached_blocks(device, disk_id, extent, start, end) if device else None
        if cached is None or bad_blocks(*cached):
            return None
        return cached[0]

    def _cached_blocks(
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

    async def _inline_checkpoint(self) -> None:
        """After a read served at once: still a cancellation point, and a scheduling point
        now and then, so a scrub over cached data cannot starve the requests being served."""
        self._inline_reads += 1
        if self._inline_reads % INLINE_READS_PER_YIELD:
            await trio.lowlevel.checkpoint_if_cancelled()
        else:
            await trio.lowlevel.checkpoint()

    async def _read_verified(
        self, extents: Extents, position: int, start: int, end: int
    ) -> bytes | Fault:
        result = await self._read_checked(extents, position, start, end)
        return result if isinstance(result, Fault) else result[0]

    async def _write_verified(
        self, extents: Extents, position: int, start: int, data: bytes | memoryview,
        *, seq: int = 0, entries: bytes | None = None, resync: bool = False,
    ) -> bool:
        """Write whole blocks and their checksum entries (computed for write `seq`, or the
        given ones when copying); False if the disk is out (a failed write takes the disk
        out of service, durably, before returning)."""
        disk_id, extent = extents[position]
        device = self.pool.extent_device(disk_id, extent, resync=resync)
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
            # or fails by the I/O timeout inside _device_op.
            await self._device_op(disk_id, "write", lambda: self.pool.checksums.write(
                disk_id, extent, start // BLOCK, entries, data=(offset, data)), shield=True)
            return True
        except DeviceError as error:
            self.pool.disks[disk_id].errors["write"] += 1
            await self.pool.mark_failed(disk_id, str(error))
            return False

    async def _write_extents(
        self, extents: Extents, writes: list[ExtentWrite], seq: int
    ) -> list[bool]:
        """Write each (extent position, offset, payload) with its checksum entries for write
        `seq`, all at once; True where written (False: the disk is out, or was just taken
        out). Writes to disks that take io_uring go out in one submission with one wait;
        the others, and any that did not complete cleanly that way, go through
        `_write_verified` (retries; a real error fails the disk)."""
        written = [False] * len(writes)
        careful: list[int] = []
        staged: list[tuple[int, Device, int, Patches, uring.Chain]] = []
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

        async def write_one(index: int) -> None:
            position, offset, payload = writes[index]
            written[index] = await self._write_verified(
                extents, position, offset, payload, entries=entries_of[id(payload)])

        await run_all([bind(write_one, index) for index in careful])
        return written

    async def _run_batch(
        self, staged: list[tuple[int, Device, int, Patches, uring.Chain]], written: list[bool]
    ) -> list[int]:
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
            if results is None:  # no answer in time: as _device_op, the disk goes
                self.pool.disks[disk_id].errors["write"] += 1
                with trio.CancelScope(shield=True):
                    await self.pool.mark_failed(
                        disk_id, f"no answer to a write within {timeout:g}s")
            elif uring.check(results, [view.nbytes for _, view in chain.pieces]) is None:
                device.ring_written(chain)
                written[index] = True
            else:  # failed or short: the careful path retries, and fails the disk if it must
                redo.append(index)
        return redo

    async def _write_runs(
        self, extents: Extents, position: int, start: int, blocks: list[int],
        data: bytes | bytearray, entries: bytes | bytearray,
    ) -> int:
        """Rewrite some blocks of an extent (runs of consecutive ones) with given contents;
        returns blocks written."""
        written = 0
        for first, count in block_runs(blocks):
            lo, hi = first * BLOCK, (first + count) * BLOCK
            if await self._write_verified(
                extents, position, start + lo, bytes(data[lo:hi]),
                entries=bytes(entries[first * ENTRY_SIZE : (first + count) * ENTRY_SIZE]),
            ):
                written += count
        return written

    # ---- reads ----------------------------------------------------------------------

    async def _read_slab(self, slab: int, offset: int, out: memoryview) -> None:
        await self._resync_if_pending(slab, offset, offset + len(out))
        while True:
            extents = self.record.slabs.get(slab)
            if extents is None:
                return  # unallocated: reads as zeros, and `out` is already zeroed
            await self._read_range(slab, extents, offset, out, locked=False)
            # A move that switched the slab's map meanwhile may have freed (and even
            # reused) an extent this read came from: read again from the new map.
            if self.record.slabs.get(slab) is extents:
                return

    def _current_extents(self, slab: int) -> Extents:
        """The slab's extents as the map says now. Taken again once the row locks are held:
        a move may have switched the map while the caller waited for them."""
        return self.record.slabs[slab]

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
        if self.spec.kind == "parity":
            data = await self._read_parity_column(slab, extents, piece.row, piece.column,
                                                  start, end, locked=locked)
        else:
            data = await self._read_copies(slab, extents, piece.row, piece.column,
                                           start, end, locked=locked)
        self._scatter(out, piece, data, piece.column_offset - start)

    async def _read_copies(
        self, slab: int, extents: Extents, row: int, column: int, start: int, end: int,
        *, locked: bool,
    ) -> bytes:
        """Simple and mirror: the first copy that verifies and is not older than the other
        copies' entries say. Anything else (a bad, unreadable or stale copy) goes to the
        careful path under the row locks, which compares every copy and repairs."""
        positions = data_positions(self.spec, row, column)
        if not locked:
            for position in positions:
                result = await self._read_checked(extents, position, start, end)
                if result is Fault.MISSING:
                    self._degraded_reads += 1
                    continue  # nothing to repair on a disk that is out
                if isinstance(result, tuple):
                    data, entries = result
                    others = await self.entries_by_position(
                        extents, [p for p in positions if p != position], start, end)
                    if not newer_elsewhere(entries, list(others.values())):
                        return data
                break
            async with self._row_locks.hold(self._column_rows(slab, start, end)):
                extents = self._current_extents(slab)
                return (await self.merge_copies(slab, extents, column, start, end))[0]
        return (await self.merge_copies(slab, extents, column, start, end))[0]

    async def entries_by_position(
        self, extents: Extents, positions: Iterable[int], start: int, end: int,
        *, resync: bool = False,
    ) -> dict[int, bytes]:
        """Checksum entries of blocks [start, end) of each extent position whose disk is in
        service and answers; `resync`: also of extents awaiting their resync."""
        found = {}
        for position in positions:
            disk_id, extent = extents[position]
            if self.pool.extent_device(disk_id, extent, resync=resync) is None:
                continue
            try:  # bounded like every device call: a disk that hangs here is failed too
                found[position] = await self._device_op(disk_id, "checksum read", partial(
                    self.pool.checksums.read, disk_id, extent, start // BLOCK,
                    (end - start) // BLOCK))
            except DeviceError:
                continue
        return found

    async def read_copies_raw(
        self, extents: Extents, column: int, start: int, end: int
    ) -> tuple[dict[int, tuple[bytes, bytes]], list[int]]:
        """Every copy of a column range, unverified: ({position: (data, entries)}, positions
        whose read failed). Disks that are out are left out of both."""
        copies: dict[int, tuple[bytes, bytes]] = {}
        unreadable = []
        for position in sorted(data_positions(self.spec, 0, column)):
            raw = await self._read_raw(extents, position, start, end)
            if isinstance(raw, tuple):
                copies[position] = raw
            elif raw is Fault.UNREADABLE:
                unreadable.append(position)
        return copies, unreadable

    async def merge_copies(
        self, slab: int, extents: Extents, column: int, start: int, end: int,
        *, repair: bool = True,
    ) -> tuple[bytes, bytes, Choice]:
        """Compare every copy of a column range block by block, take the newest that
        verifies, and (with `repair`) rewrite the others. Caller holds the row locks.
        Unrecoverable if some block has no good copy."""
        copies, unreadable = await self.read_copies_raw(extents, column, start, end)
        if not copies:
            raise Unrecoverable(
                f"volume {self.name!r}: no readable copy of slab {slab} at extent offset {start}"
            )
        choice = choose_blocks(copies)
        for position, count in choice.failed.items():
            disk_id, extent = extents[position]
            log.warning("checksum mismatch on disk %d, extent %d: %d blocks", disk_id, extent,
                        count)
            await self.pool.count_checksum_errors(disk_id, count)
        blocks = (end - start) // BLOCK
        for position in unreadable:  # a drive remaps a sector when it is written again
            choice.repairs[position] = list(range(blocks))
        if choice.unrecoverable:
            first = start + choice.unrecoverable[0] * BLOCK
            raise Unrecoverable(
                f"volume {self.name!r}: no good copy of slab {slab} at extent offset {first}"
            )
        if repair:
            for position, indexes in sorted(choice.repairs.items()):
                healed = await self._write_runs(extents, position, start, sorted(set(indexes)),
                                                choice.data, choice.entries)
                if healed:
                    self._healed_blocks += healed
                    log.info("healed %d blocks of slab %d on position %d", healed, slab, position)
        return bytes(choice.data), bytes(choice.entries), choice

    async def _read_parity_column(
        self, slab: int, extents: Extents, row: int, column: int, start: int, end: int,
        *, locked: bool,
    ) -> bytes:
        """Parity: the data column directly, else rebuilt from the row (under its lock)."""
        result = await self._read_verified(extents, code_position(self.spec, row, column),
                                           start, end)
        if isinstance(result, bytes):
            return result
        self._degraded_reads += 1
        unit_start = start - row_start(self.spec, row)
        unit_end = end - row_start(self.spec, row)
        if not locked:
            async with self._row_locks.hold([(slab, row)]):
                extents = self._current_extents(slab)
                rebuilt = await self._fragments(slab, extents, row, unit_start, unit_end, [column])
        else:
            rebuilt = await self._fragments(slab, extents, row, unit_start, unit_end, [column])
        return rebuilt[column]

    async def _fragments(
        self, slab: int, extents: Extents, row: int, start: int, end: int, wanted: list[int]
    ) -> dict[int, bytes]:
        """Parity: bytes [start, end) of the row's unit for code fragments `wanted`, rebuilt
        from the others when some are missing or corrupt; corrupt ones are rewritten.
        The caller holds the row lock."""
        assert self.codec is not None
        offset = row_start(self.spec, row) + start
        # The usual case, a small write's read-modify-write: every fragment in memory and
        # sound. Taken at once, with no task per fragment.
        now: dict[int, bytes] = {}
        for index in wanted:
            data = self._extent_now(extents, code_position(self.spec, row, index), offset,
                                    offset + end - start)
            if data is None:
                break  # the careful path below reads them all
            now[index] = data
        else:
            return now
        found: dict[int, bytes] = {}
        corrupt: list[int] = []

        async def fetch(index: int) -> None:
            position = code_position(self.spec, row, index)
            result = await self._read_verified(extents, position, offset, offset + end - start)
            if isinstance(result, bytes):
                found[index] = result
            elif result is Fault.CORRUPT:
                corrupt.append(index)
                disk_id, extent = extents[position]
                log.warning("checksum mismatch on disk %d, extent %d (slab %d row %d)",
                            disk_id, extent, slab, row)
                await self.pool.count_checksum_errors(disk_id, 1)

        await run_all([bind(fetch, index) for index in wanted])
        if all(index in found for index in wanted):
            return {index: found[index] for index in wanted}
        await run_all([bind(fetch, i) for i in range(self.spec.width) if i not in wanted])
        if len(found) < self.spec.columns:
            raise Unrecoverable(
                f"volume {self.name!r}: slab {slab} row {row} has only {len(found)} good "
                f"fragments of the {self.spec.columns} needed"
            )
        rebuilt = self.codec.reconstruct(found, sorted(set(wanted) | set(corrupt)))
        for index in corrupt:
            position = code_position(self.spec, row, index)
            if await self._write_verified(extents, position, offset, rebuilt[index],
                                          seq=self.pool.next_seq()):
                self._healed_blocks += (end - start) // BLOCK
                log.info("healed slab %d row %d fragment %d", slab, row, index)
        return {index: rebuilt[index] for index in wanted}

    # ---- writes ---------------------------------------------------------------------

    async def _write_slab(self, slab: int, offset: int, data: memoryview) -> None:
        extents = self.record.slabs.get(slab)
        if extents is None:
            if not any(data):
                return  # zeros into unallocated space: nothing to store
            extents = await self._allocate(slab)
        end = offset + len(data)
        start, aligned_end = align_down(offset), align_up(end)
        await self._resync_if_pending(slab, start, aligned_end)
        intent = self.pool.intent
        if intent is None:
            await self._write_locked(slab, extents, offset, data)
            return
        keys = {(self.key, slab, region) for region in self._regions(slab, start, aligned_end)}
        await intent.begin(keys)
        try:
            await self._write_locked(slab, extents, offset, data)
        finally:
            intent.end(keys)

    async def _write_locked(
        self, slab: int, extents: Extents, offset: int, data: memoryview
    ) -> None:
        end = offset + len(data)
        start, aligned_end = align_down(offset), align_up(end)
        async with self._row_locks.hold(self._slab_rows(slab, start, aligned_end)):
            extents = self._current_extents(slab)
            if (start, aligned_end) != (offset, end):
                data = await self._merge_partial_blocks(slab, extents, offset, data)
            pieces = split(self.spec, start, len(data))
            with self.pool.write_in_flight() as seq:  # the same number on every copy
                await self._write_pieces(slab, extents, pieces, data, seq)

    async def _write_pieces(
        self, slab: int, extents: Extents, pieces: list[Piece], data: memoryview, seq: int
    ) -> None:
        if self.spec.kind == "parity":
            await self._write_parity_rows(slab, extents, pieces, data, seq)
            return
        writes: list[ExtentWrite] = []
        for piece in pieces:
            payload = self._gather(data, piece)
            for position in data_positions(self.spec, piece.row, piece.column):
                writes.append((position, piece.column_offset, payload))
        written = await self._write_extents(extents, writes, seq)
        copies = self.spec.copies  # writes holds each piece's copies in turn
        for number, piece in enumerate(pieces):
            if not any(written[number * copies : (number + 1) * copies]):
                raise Unrecoverable(
                    f"volume {self.name!r}: no copy of slab {slab} at {piece.column_offset} "
                    "could be written"
                )

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

    async def _allocate(self, slab: int) -> Extents:
        async with self._allocation_lock:
            extents = self.record.slabs.get(slab)
            if extents is None:
                await self.pool.allocate_slabs(self.record, [slab], degraded_ok=True)
                extents = self.record.slabs[slab]
            return extents

    async def _write_parity_rows(
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
            writes.extend(await self._parity_row_writes(slab, extents, row, row_pieces, data))

        await run_all([bind(encode, row, row_pieces) for row, row_pieces in by_row.items()])

        await self._write_extents(extents, coalesce(writes), seq)
        # The rows are recoverable only while no more than `parity` of the slab's extents are
        # lost, counting disks that were already out as well as writes that just failed.
        lost = sum(self.pool.extent_device(*extent) is None for extent in extents)
        if lost > self.spec.parity:
            rows = sorted(by_row)
            raise Unrecoverable(
                f"volume {self.name!r}: {lost} columns of slab {slab} rows "
                f"{rows[0]}-{rows[-1]} are unavailable"
            )

    async def _parity_row_writes(
        self, slab: int, extents: Extents, row: int, pieces: list[Piece], data: memoryview
    ) -> list[ExtentWrite]:
        """The extent writes that put one row's pieces and its new parity on disk. A row
        fully covered is encoded from the new data alone; otherwise the untouched part of
        the span is read first."""
        assert self.codec is not None
        ranges = {piece.column: unit_range(self.spec, piece) for piece in pieces}
        start = min(r[0] for r in ranges.values())
        end = max(r[1] for r in ranges.values())
        to_read = [c for c in range(self.spec.columns) if ranges.get(c) != (start, end)]
        old = await self._fragments(slab, extents, row, start, end, to_read) if to_read else {}
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
