"""Tiered volumes: a hot ssd tier on top of an hdd tier, moved by heat.

A tiered volume is served like any volume (read, write, flush, size, name) but keeps no
slabs of its own. It is cut into tiering *units* (`TierInfo.unit` bytes, at most a slab of
the hdd tier, a whole number of its parity rows) and holds two hidden sub-volumes, ordinary
volumes of the pool placed on one media class each (`Pool.media_excluded`):

* the **hdd tier** is as large as the volume: unit u's *home* is bytes [u*U, (u+1)*U);
* the **ssd tier** has `slots` slots of one unit; the map (in the pool metadata, committed
  through the metadata journal) says which units have a copy in which slot and whether
  that copy is newer than the home (*dirty*).

A read of a unit in the map is served from its slot (an ssd hit), else from its home.
A write goes where the unit is; with *write-back* (the hdd tier is parity: mirror-
accelerated parity) a write to a unit not on the ssd tier takes a free slot (evicting a
clean unit if needed), lands there as a whole unit and is destaged to the home later in
whole units, i.e. full parity stripes. With no slot to be had it goes to the home: writes
never fail because the ssd tier is full.

Every placement change holds the unit's lock exclusively (foreground I/O takes it shared),
so no read or write races a move, and goes copy -> verify (read back through the
checksummed sub-volume and compared) -> commit the map -> free the old slot. A crash at any
point leaves a committed map whose every entry points at verified data.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass

import trio

from blockspace.errors import DeviceError, InvalidInput
from blockspace.ondisk.metadata import TierInfo, VolumeRecord
from blockspace.pool.pool import Pool
from blockspace.tiering.heat import HeatMap
from blockspace.tiering.plan import clearly_hotter
from blockspace.volume.concurrency import bind, run_all
from blockspace.volume.volume import Volume

log = logging.getLogger(__name__)


class _LockEntry:
    __slots__ = ("readers", "writer", "waiting_writers", "users", "lot")

    def __init__(self) -> None:
        self.readers = 0
        self.writer = False
        self.waiting_writers = 0
        self.users = 0
        self.lot = trio.lowlevel.ParkingLot()


class UnitLocks:
    """A reader-writer lock per unit, held only while in use (memory bounded by the I/O in
    flight). Writers (moves) are preferred, so a stream of reads cannot starve a move."""

    def __init__(self) -> None:
        self._entries: dict[int, _LockEntry] = {}

    def _enter(self, unit: int) -> _LockEntry:
        entry = self._entries.get(unit)
        if entry is None:
            entry = self._entries[unit] = _LockEntry()
        entry.users += 1
        return entry

    def _leave(self, unit: int, entry: _LockEntry) -> None:
        entry.users -= 1
        entry.lot.unpark_all()
        if entry.users == 0:
            del self._entries[unit]

    @asynccontextmanager
    async def shared(self, unit: int) -> AsyncIterator[None]:
        entry = self._enter(unit)
        try:
            while entry.writer or entry.waiting_writers:
                await entry.lot.park()
            entry.readers += 1
            try:
                yield
            finally:
                entry.readers -= 1
        finally:
            self._leave(unit, entry)

    @asynccontextmanager
    async def exclusive(self, unit: int) -> AsyncIterator[None]:
        entry = self._enter(unit)
        try:
            entry.waiting_writers += 1
            try:
                while entry.writer or entry.readers:
                    await entry.lot.park()
            finally:
                entry.waiting_writers -= 1
            entry.writer = True
            try:
                yield
            finally:
                entry.writer = False
        finally:
            self._leave(unit, entry)

    def busy(self) -> int:
        return len(self._entries)


@dataclass
class TierCounters:
    reads: int = 0  # read pieces (one per unit a read touches)
    ssd_hits: int = 0
    writes: int = 0
    ssd_writes: int = 0
    write_allocations: int = 0  # units a write brought onto the ssd tier
    writes_bypassed: int = 0  # write-back writes that found no slot and went to the hdd tier
    promotions: int = 0
    demotions: int = 0
    destages: int = 0
    bytes_promoted: int = 0
    bytes_demoted: int = 0  # bytes copied to the hdd tier by demotions and destages
    failed_moves: int = 0


def pinned_tier(pins: list[tuple[int, int, str]], unit: int, unit_size: int) -> str | None:
    """The tier a unit is pinned to (a pin overlapping any byte of it), if any."""
    start, end = unit * unit_size, (unit + 1) * unit_size
    for offset, length, tier in pins:
        if offset < end and start < offset + length:
            return tier
    return None


def units_of_range(offset: int, length: int, unit_size: int) -> range:
    return range(offset // unit_size, (offset + length - 1) // unit_size + 1)


class TieredVolume:
    def __init__(
        self, pool: Pool, record: VolumeRecord, ssd: Volume, hdd: Volume,
        heat: HeatMap | None = None,
    ) -> None:
        assert record.tiers is not None
        self.pool = pool
        self.record = record
        self.tiers: TierInfo = record.tiers
        self.unit = self.tiers.unit
        self.units = record.size // self.unit
        self.slots = ssd.size // self.unit
        self.ssd = ssd
        self.hdd = hdd
        self.heat = heat if heat is not None else HeatMap(self.units)
        self.locks = UnitLocks()
        self.counters = TierCounters()
        # Mirror-accelerated parity: writes land on the ssd tier, destaged in full stripes.
        self.write_back = hdd.spec.kind == "parity"
        used = {slot for slot, _ in self.tiers.map.values()}
        self._free = set(range(self.slots)) - used
        self._version = self._persisted = 0
        self._persist_lock = trio.Lock()
        self.last_write: dict[int, float] = {}  # dirty unit -> last write (monotonic)
        self._coldest: tuple[float, float] = (0.0, -1.0)  # (heat, when): scans are O(slots)
        self.dirty_changed = trio.Event()

    # ---- what the FUSE adapter and the daemon use ----------------------------------

    @property
    def name(self) -> str:
        return self.record.name

    @property
    def size(self) -> int:
        return self.record.size

    @property
    def slab_data_size(self) -> int:
        return self.hdd.slab_data_size

    @property
    def map(self) -> dict[int, tuple[int, bool]]:
        return self.tiers.map

    def free_slots(self) -> int:
        return len(self._free)

    def dirty_units(self) -> list[int]:
        return sorted(u for u, (_, dirty) in self.map.items() if dirty)

    async def flush(self) -> None:
        await self.pool.flush()

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise InvalidInput(
                f"I/O at {offset}+{length} is outside volume {self.name!r} of {self.size} bytes"
            )

    def _pieces(self, offset: int, length: int) -> list[tuple[int, int, int, int]]:
        """(unit, offset in unit, offset in request, count) per unit touched."""
        pieces = []
        position, end = offset, offset + length
        while position < end:
            unit, unit_offset = divmod(position, self.unit)
            count = min(self.unit - unit_offset, end - position)
            pieces.append((unit, unit_offset, position - offset, count))
            position += count
        return pieces

    # ---- reads ----------------------------------------------------------------------

    async def read(self, offset: int, length: int) -> bytes | bytearray:
        self._check_range(offset, length)
        pieces = self._pieces(offset, length)
        if len(pieces) == 1:  # the common case: no nursery, no copy
            return await self._read_piece(pieces[0][0], pieces[0][1], length)
        whole = await self._at_home(offset, length, [p[0] for p in pieces], None)
        if whole is not None:
            return whole
        out = bytearray(length)
        view = memoryview(out)

        async def piece(unit: int, unit_offset: int, start: int, count: int) -> None:
            view[start : start + count] = await self._read_piece(unit, unit_offset, count)

        await run_all([bind(piece, *p) for p in pieces])
        return bytes(out)

    async def _at_home(self, offset: int, length: int, units: list[int],
                       data: memoryview | None) -> bytes | bytearray | None:
        """A request over several units none of which is on the ssd tier (and, for a write,
        that would go home anyway) in one hdd-tier call: b"" for a write done, the bytes
        for a read, None if some unit needs the unit-by-unit path."""
        if any(u in self.map for u in units):
            return None
        if data is not None and self.write_back and not self._bypasses(units, data):
            return None
        async with AsyncExitStack() as stack:
            for unit in units:  # ascending: lock order, no deadlock with other requests
                await stack.enter_async_context(self.locks.shared(unit))
            if any(u in self.map for u in units):
                return None
            for unit in units:
                self.heat.touch(unit)
            if data is None:
                self.counters.reads += len(units)
                return await self.hdd.read(offset, length)
            self.counters.writes += len(units)
            if self.write_back:
                self.counters.writes_bypassed += len(units)
            await self.hdd.write(offset, data)
            return b""

    def _bypasses(self, units: list[int], data: memoryview) -> bool:
        """Whether a write-back write of these units would send every piece home."""
        if not data.tobytes().lstrip(b"\0"):
            return True
        if all(pinned_tier(self.tiers.pins, u, self.unit) == "hdd" for u in units):
            return True
        if self._free:
            return False
        coldest, when = self._coldest
        if time.monotonic() - when >= 1.0:
            return False  # not known: the unit-by-unit path looks
        hottest = max(self.heat.heat(u) for u in units) + 1.0  # with this write's touch
        return not clearly_hotter(hottest, coldest)

    async def _read_piece(self, unit: int, unit_offset: int, count: int) -> bytes | bytearray:
        async with self.locks.shared(unit):
            entry = self.map.get(unit)
            self.counters.reads += 1
            self.heat.touch(unit)
            if entry is not None:
                self.counters.ssd_hits += 1
                return await self.ssd.read(entry[0] * self.unit + unit_offset, count)
            return await self.hdd.read(unit * self.unit + unit_offset, count)

    # ---- writes ---------------------------------------------------------------------

    async def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self._check_range(offset, len(data))
        view = memoryview(data)
        pieces = self._pieces(offset, len(data))
        if len(pieces) == 1:
            await self._write_piece(pieces[0][0], pieces[0][1], view)
            return
        if await self._at_home(offset, len(data), [p[0] for p in pieces], view) is not None:
            return
        await run_all([
            bind(self._write_piece, unit, unit_offset, view[start : start + count])
            for unit, unit_offset, start, count in pieces
        ])

    async def _write_piece(self, unit: int, unit_offset: int, payload: memoryview) -> None:
        self.counters.writes += 1
        self.heat.touch(unit)
        to_hdd = not self.write_back or not payload.tobytes().lstrip(b"\0") or (
            pinned_tier(self.tiers.pins, unit, self.unit) == "hdd")
        for _attempt in range(3):
            async with self.locks.shared(unit):
                entry = self.map.get(unit)
                if entry is not None:
                    await self._write_resident(unit, entry, unit_offset, payload)
                    return
                if to_hdd:
                    await self.hdd.write(unit * self.unit + unit_offset, payload)
                    return
            # Write-back of a unit not on the ssd tier: bring it there (no lock held while
            # room is made, so no two unit locks are ever held at once), taking the slot
            # of a clean unit only if this one is clearly hotter (a bulk write of cold
            # data does not flush the hot data out).
            if not self._free and not await self.evict_one_clean(self.heat.heat(unit)):
                self.counters.writes_bypassed += 1
                self.dirty_changed.set()  # the destager makes room for the next ones
                to_hdd = True
                continue
            if await self._write_allocate(unit, unit_offset, payload):
                return
        async with self.locks.shared(unit):  # the map kept changing: write where it is now
            entry = self.map.get(unit)
            if entry is not None:
                await self._write_resident(unit, entry, unit_offset, payload)
            else:
                await self.hdd.write(unit * self.unit + unit_offset, payload)

    async def _write_resident(
        self, unit: int, entry: tuple[int, bool], unit_offset: int, payload: memoryview
    ) -> None:
        """A write to a unit on the ssd tier (caller holds its lock shared). Its copy is
        marked dirty durably before the data changes: a clean copy may be dropped at any
        time, so it must never hold data the home has not."""
        slot, dirty = entry
        if not dirty:
            self.map[unit] = (slot, True)
            await self.persist()
        self.last_write[unit] = time.monotonic()
        self.dirty_changed.set()
        self.counters.ssd_writes += 1
        await self.ssd.write(slot * self.unit + unit_offset, payload)

    async def _write_allocate(self, unit: int, unit_offset: int, payload: memoryview) -> bool:
        """Put a whole unit with this write applied into a free slot; False if the map
        changed meanwhile (the caller tries again)."""
        async with self.locks.exclusive(unit):
            if unit in self.map or not self._free:
                return False
            slot = min(self._free)
            self._free.discard(slot)
            try:
                if unit_offset == 0 and len(payload) == self.unit:
                    whole: bytes | bytearray = bytes(payload)
                else:
                    whole = bytearray(await self.hdd.read(unit * self.unit, self.unit))
                    whole[unit_offset : unit_offset + len(payload)] = payload
                await self.ssd.write(slot * self.unit, whole)
                self.map[unit] = (slot, True)
                await self.persist()  # flushes every disk: the data is durable too
            except BaseException:
                self.map.pop(unit, None)
                self._free.add(slot)
                raise
            self.last_write[unit] = time.monotonic()
            self.counters.write_allocations += 1
            self.counters.ssd_writes += 1
            self.dirty_changed.set()
            return True

    # ---- the map ----------------------------------------------------------------------

    async def persist(self) -> None:
        """Commit the map (group commit: callers that changed it while another commit ran
        share the next one)."""
        self._version += 1
        mine = self._version
        async with self._persist_lock:
            if self._persisted >= mine:
                return
            version = self._version
            await self.pool.commit()
            self._persisted = max(self._persisted, version)

    # ---- moves: copy -> verify -> commit -> free ---------------------------------------

    async def _copy_verified(self, read: Callable[[], Awaitable[bytes | bytearray]],
                             target: Volume, offset: int) -> bytes | bytearray:
        data = await read()
        await target.write(offset, data)
        back = await target.read(offset, len(data))  # checksums verified on the way
        if back != data:
            raise DeviceError(f"volume {self.name}: a tier copy did not read back as written")
        return data

    async def promote(self, unit: int) -> bool:
        """Copy a unit's home into a free ssd slot (clean). False if there was nothing to
        do (already there, or no free slot)."""
        async with self.locks.exclusive(unit):
            if unit in self.map or not self._free:
                return False
            slot = min(self._free)
            self._free.discard(slot)
            try:
                await self._copy_verified(
                    lambda: self.hdd.read(unit * self.unit, self.unit), self.ssd,
                    slot * self.unit)
                self.map[unit] = (slot, False)
                await self.persist()
            except BaseException:
                self.map.pop(unit, None)
                self._free.add(slot)
                raise
            self.counters.promotions += 1
            self.counters.bytes_promoted += self.unit
            return True

    async def _destage_locked(self, unit: int, slot: int) -> None:
        await self._copy_verified(
            lambda: self.ssd.read(slot * self.unit, self.unit), self.hdd, unit * self.unit)
        self.counters.bytes_demoted += self.unit

    async def destage(self, unit: int) -> bool:
        """Copy a dirty unit home (whole units: full parity stripes); it stays on the ssd
        tier, clean."""
        async with self.locks.exclusive(unit):
            entry = self.map.get(unit)
            if entry is None or not entry[1]:
                return False
            await self._destage_locked(unit, entry[0])
            self.map[unit] = (entry[0], False)
            try:
                await self.persist()
            except BaseException:
                self.map[unit] = entry
                raise
            self.last_write.pop(unit, None)
            self.counters.destages += 1
            return True

    async def demote(self, unit: int) -> bool:
        """Take a unit off the ssd tier: copy it home if dirty, commit, free the slot."""
        async with self.locks.exclusive(unit):
            entry = self.map.get(unit)
            if entry is None:
                return False
            slot, dirty = entry
            if dirty:
                await self._destage_locked(unit, slot)
            del self.map[unit]
            try:
                await self.persist()
            except BaseException:
                self.map[unit] = entry
                raise
            self._free.add(slot)  # only once the map without it is durable
            self.last_write.pop(unit, None)
            self.counters.demotions += 1
            return True

    async def evict_one_clean(self, for_heat: float | None = None) -> bool:
        """Free a slot by dropping the coldest clean unit not pinned to the ssd tier (if
        `for_heat` is given: only one clearly colder than that)."""
        coldest, when = self._coldest
        now = time.monotonic()
        if for_heat is not None and now - when < 1.0 and not clearly_hotter(for_heat, coldest):
            return False  # no clean unit was colder than this a moment ago: do not rescan
        candidates = [
            u for u, (_, dirty) in self.map.items()
            if not dirty and pinned_tier(self.tiers.pins, u, self.unit) != "ssd"
        ]
        if not candidates:
            self._coldest = (math.inf, now)
            return False
        victim = min(candidates, key=lambda u: (self.heat.heat(u), u))
        self._coldest = (self.heat.heat(victim), now)
        if for_heat is not None and not clearly_hotter(for_heat, self._coldest[0]):
            return False
        await self.demote(victim)
        return bool(self._free)
