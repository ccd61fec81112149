"""Write-intent log: which regions may hold writes that are not yet safely on every column.

Before a write starts, the regions it touches are recorded durably as dirty (on every usable
disk, in the two intent slots after the metadata, alternating by generation). Regions are
cleared lazily: once no write to them is in flight and a flush has made their writes
durable, a background pass drops them from the set. After an unclean stop, the regions still
in the set are the only places where mirror copies may differ, parity may not match its
data, or a checksum may not match its block: the next mount resyncs just those.

Record: magic b"BLKSPCWI" | u32 version | u32 count | u64 generation | u64 xxh3_64(entries)
| 16 bytes pool UUID | entries, each u64 volume key | u32 slab | u32 region.
"""

import logging
import struct
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

import trio
import xxhash

from blockspace.disks.devices import Device
from blockspace.errors import DeviceError, FormatError
from blockspace.ondisk.label import INTENT_SLOT_SIZE, DiskGeometry

log = logging.getLogger(__name__)

MAGIC = b"BLKSPCWI"
VERSION = 2  # 2 adds the region size; version 1 records had 1 MiB regions
_HEADER_V1 = struct.Struct("<8sIIQQ16s")
_HEADER = struct.Struct("<8sIIQQ16sII")  # ..., region size in bytes, reserved (0)
_ENTRY = struct.Struct("<QII")
MAX_ENTRIES = (INTENT_SLOT_SIZE - _HEADER.size) // _ENTRY.size
# Granularity, in bytes of each extent. A first write into a clean region waits for an intent
# record flushed on every disk: 4 MiB regions make that 4x rarer than 1 MiB for random
# writes (4K random writes at qd1 doubled), at the price of resyncing 4 MiB per dirty region
# after an unclean stop. A record says the size it was written with (`rescale`).
REGION_SIZE = 4 << 20
V1_REGION_SIZE = 1 << 20
Key = tuple[int, int, int]  # volume key, slab, region
Persist = Callable[[int, set[Key]], Awaitable[None]]  # write a record durably
Flush = Callable[[], Awaitable[None]]  # make every completed write durable


def volume_key(volume_uuid: str) -> int:
    """A volume's 64-bit key in the log (the high half of its UUID)."""
    return uuid.UUID(volume_uuid).int >> 64


def region_size(interleave: int, base: int = REGION_SIZE) -> int:
    """A volume's region size: the base, or one stripe unit if that is larger (a region is
    a whole number of rows)."""
    return max(base, interleave)


def rescale(keys: Iterable[Key], old_base: int, interleaves: dict[int, int]) -> set[Key]:
    """Keys recorded with regions of `old_base` bytes as today's regions covering at least
    the same bytes. `interleaves`: volume key -> stripe unit; keys of other volumes (deleted
    since) are kept as they are."""
    scaled: set[Key] = set()
    for key in keys:
        volume, slab, region = key
        interleave = interleaves.get(volume)
        if interleave is None:
            scaled.add(key)
            continue
        old, new = region_size(interleave, old_base), region_size(interleave)
        start, end = region * old, (region + 1) * old
        scaled.update((volume, slab, r) for r in range(start // new, (end - 1) // new + 1))
    return scaled


def encode_intent(generation: int, pool_uuid: str, keys: Iterable[Key]) -> bytes:
    entries = b"".join(_ENTRY.pack(*key) for key in sorted(keys))
    count = len(entries) // _ENTRY.size
    if count > MAX_ENTRIES:
        raise ValueError(f"{count} dirty regions do not fit the intent slot ({MAX_ENTRIES})")
    header = _HEADER.pack(
        MAGIC, VERSION, count, generation, xxhash.xxh3_64_intdigest(entries),
        uuid.UUID(pool_uuid).bytes, REGION_SIZE, 0,
    )
    return header + entries


def decode_intent(raw: bytes, pool_uuid: str) -> tuple[int, set[Key], int]:
    """(generation, dirty regions, their region size); FormatError for anything torn,
    foreign or crafted."""
    if len(raw) < _HEADER_V1.size:
        raise FormatError("intent record is truncated")
    magic, version, count, generation, digest, owner = _HEADER_V1.unpack_from(raw)
    if magic != MAGIC:
        raise FormatError("no intent record")
    if version == 1:
        header_size, base = _HEADER_V1.size, V1_REGION_SIZE
    elif version == VERSION:
        if len(raw) < _HEADER.size:
            raise FormatError("intent record is truncated")
        header_size, base = _HEADER.size, _HEADER.unpack_from(raw)[6]
        if base < 4096 or base & (base - 1):
            raise FormatError(f"intent record has a region size of {base} bytes")
    else:
        raise FormatError(f"intent record version {version} is not supported")
    if owner != uuid.UUID(pool_uuid).bytes:
        raise FormatError("intent record of another pool")
    if count > MAX_ENTRIES or header_size + count * _ENTRY.size > len(raw):
        raise FormatError(f"intent record claims {count} entries")
    entries = bytes(raw[header_size : header_size + count * _ENTRY.size])
    if xxhash.xxh3_64_intdigest(entries) != digest:
        raise FormatError("intent record checksum mismatch")
    keys = {_ENTRY.unpack_from(entries, i * _ENTRY.size) for i in range(count)}
    return generation, keys, base


def read_intent(
    members: Iterable[tuple[Device, DiskGeometry]], pool_uuid: str
) -> tuple[int, set[Key], int]:
    """The newest valid intent record on any of the disks (generation 0, empty if none),
    with the region size its keys count in."""
    best: tuple[int, set[Key], int] = (0, set(), REGION_SIZE)
    for device, geometry in members:
        for slot in (0, 1):
            try:
                raw = device.read_sync(geometry.intent_slot_offset(slot), INTENT_SLOT_SIZE)
                found = decode_intent(raw, pool_uuid)
            except (FormatError, DeviceError):
                continue
            if found[0] > best[0]:
                best = found
    return best


@dataclass(frozen=True)
class IntentStats:
    dirty_regions: int
    commits: int
    in_flight: int


class IntentLog:
    """The in-memory side of the log. The pool supplies `persist` (write a record to every
    usable disk and flush them) and `flush` (fdatasync every disk)."""

    def __init__(self, persist: Persist, flush: Flush, generation: int, durable: set[Key]) -> None:
        self._persist = persist
        self._flush = flush
        self.generation = generation
        self.durable: set[Key] = set(durable)  # on disk as dirty
        self._wanted: set[Key] = set()  # waiting to be recorded
        self._in_flight: Counter[Key] = Counter()
        self._last_done: dict[Key, float] = {}  # when the last write to a region completed
        self._committing = False
        self._committed = trio.Event()
        self._held: set[Key] = set()  # awaiting resync: never cleared by the cleaner
        self._clearing: set[Key] = set()  # leaving the durable set by the commit under way
        self.commits = 0

    def statistics(self) -> IntentStats:
        return IntentStats(len(self.durable), self.commits, sum(self._in_flight.values()))

    def hold(self, keys: Iterable[Key]) -> None:
        """Keep regions dirty until `release` (used for regions awaiting resync)."""
        self._held.update(keys)

    def release(self, key: Key) -> None:
        self._held.discard(key)
        self._last_done.setdefault(key, 0.0)

    async def begin(self, keys: set[Key]) -> None:
        """Mark regions durably dirty (returns once they are) and count a write in flight."""
        self._in_flight.update(keys)
        try:
            while not self._marked(keys):
                self._wanted |= keys - self.durable
                if self._committing:
                    await self._committed.wait()
                elif len(self.durable | self._wanted) > MAX_ENTRIES:
                    # The log is full: make room by flushing and clearing idle regions.
                    if not await self.clean(idle=0.0):
                        await trio.sleep(0.01)
                else:
                    await self._commit()
        except BaseException:
            self._in_flight.subtract(keys)
            raise

    def _marked(self, keys: set[Key]) -> bool:
        """Dirty on the disks, and staying so: a region that the commit under way is
        clearing is still in `durable` until that record lands, but must be marked again."""
        return keys <= self.durable and not keys & self._clearing

    def end(self, keys: set[Key]) -> None:
        now = trio.current_time()
        self._in_flight.subtract(keys)
        for key in keys:
            if self._in_flight[key] <= 0:
                del self._in_flight[key]
            self._last_done[key] = now

    def clean_candidates(self, idle: float) -> set[Key]:
        """Regions with no write in flight and none completed in the last `idle` seconds."""
        cutoff = trio.current_time() - idle
        return {
            key
            for key in self.durable
            if key not in self._in_flight
            and key not in self._held
            and self._last_done.get(key, 0.0) <= cutoff
        }

    async def clean(self, idle: float) -> int:
        """Flush the disks, then drop idle regions from the durable set."""
        candidates = self.clean_candidates(idle)
        if not candidates:
            return 0
        await self._flush()  # their writes completed before this flush started: now durable
        candidates &= self.clean_candidates(idle)  # still idle after the flush
        if not candidates:
            return 0
        while self._committing:
            await self._committed.wait()
        await self._commit(remove=candidates)
        for key in candidates:
            self._last_done.pop(key, None)
        return len(candidates)

    async def _commit(self, remove: set[Key] | None = None) -> None:
        self._committing = True
        try:
            target = (self.durable | self._wanted) - (remove or set())
            if len(target) > MAX_ENTRIES:  # record what fits; the rest wait for cleaning
                target = set(sorted(target, key=lambda k: k not in self.durable)[:MAX_ENTRIES])
            self.generation += 1
            self._clearing = self.durable - target
            await self._persist(self.generation, target)
            self.durable = target
            self._wanted -= target
            self.commits += 1
        finally:
            self._clearing = set()
            self._committing = False
            self._committed.set()
            self._committed = trio.Event()

    async def run_cleaner(self, interval: float = 5.0, idle: float = 10.0) -> None:
        """Background task: every `interval` seconds, clear regions idle for `idle` seconds.
        Idle long enough that a busy region stays dirty (a write into a clean region waits
        for an intent commit on every disk), short enough that little is left to resync."""
        while True:
            await trio.sleep(interval)
            try:
                cleared = await self.clean(idle)
            except DeviceError as error:
                log.warning("intent log cleaning failed: %s", error)
                continue
            if cleared:
                log.debug("intent log: %d regions clean, %d dirty", cleared, len(self.durable))

