"""A pool: its disks, their labels, and the replicated metadata.

Each metadata generation is appended to the journal of the active slot of every usable disk
(or checkpointed whole into the other slot: blockspace/pool/metastore.py), each flushed,
before a change is acknowledged; opening takes the highest generation that verifies on any
disk. A disk that was missing or failed when the metadata last changed stays out of service
even if it comes back: its contents are stale.
"""

import logging
import os
import stat
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

import trio

from blockspace.disks.devices import Device, FileDevice
from blockspace.disks.io_errors import io_error_line
from blockspace.errors import (
    BlockspaceError,
    DeviceError,
    FormatError,
    HostSpaceError,
    InvalidInput,
    NoSpace,
)
from blockspace.geometry.allocator import Extent, ExtentAllocator
from blockspace.geometry.erasure import (
    FRAGMENT_FORMAT,
    LIBRARY,
    BackendMissing,
    check_backend,
    default_backend,
)
from blockspace.geometry.erasure import self_test as erasure_self_test
from blockspace.geometry.layouts import LayoutSpec, absent_positions
from blockspace.ondisk.checksums import self_test as checksum_self_test
from blockspace.ondisk.journal import (
    encode_checkpoint,
    encode_record,
    encode_seal,
    min_slot_size,
    tier_slots_bound,
)
from blockspace.ondisk.label import (
    BLOCK,
    LABEL_SIZE,
    MEDIA,
    DiskGeometry,
    DiskLabel,
    compute_geometry,
    decode_label,
    encode_label,
    pick_label,
    size_problem,
    validate_name,
)
from blockspace.ondisk.metadata import (
    MAX_VOLUME_SIZE,
    CodecInfo,
    DiskRecord,
    ExtentsInUse,
    PoolMetadata,
    TrackedMap,
    VolumeRecord,
    snapshot,
)
from blockspace.pool.checksum_store import ChecksumStore
from blockspace.pool.intent import (
    IntentLog,
    encode_intent,
    read_intent,
    rescale,
    volume_key,
)
from blockspace.pool.intent import Key as IntentKey
from blockspace.pool.metastore import (
    MIN_RESERVE,
    JournalPosition,
    SlotScan,
    load_newest,
    own_state,
    scan_member,
)
from blockspace.units import format_size
from blockspace.volume.concurrency import bind, run_all

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_SLAB_SIZE = 64 << 20
DEFAULT_META_SLOT_SIZE = 4 << 20
DEFAULT_IO_TIMEOUT = 30.0
# Readable and written; retiring takes no new data; each extent of a resyncing disk (back
# after being away) is used only once resynced.
# A failing disk (repeated checksum errors) still serves and is healed: a warning to
# replace it.
USABLE_STATES = ("online", "retiring", "resyncing", "failing")
ALLOCATABLE_STATES = ("online", "resyncing", "failing")
HOST_ROOM = 1 << 20  # free bytes on a host file system that end its "full" condition
FAILING_CHECKSUM_ERRORS = 64  # bad blocks in one session that make a disk "failing"
# Write sequence numbers are wall-clock nanoseconds: a session's writes are numbered above
# its start less this much (a clock stepped back between sessions).
CLOCK_MARGIN = 10 * 10**9

# Known-answer self-tests that passed in this process ("xxh3", erasure backends), and the
# erasure codes found to load: each is checked once, at the first pool that needs it.
_SELF_TESTED: set[str] = set()
_CODECS_CHECKED: set[tuple[str, str, int, int, str]] = set()


def self_test_once(what: str) -> None:
    """The known-answer test of the block checksum ("xxh3") or of one erasure backend, at
    start-up: SelfTestFailed (refusing to open) on a wrong answer."""
    if what in _SELF_TESTED:
        return
    if what == "xxh3":
        checksum_self_test()
    else:
        erasure_self_test(what)
    _SELF_TESTED.add(what)


@dataclass
class PoolDisk:
    """A member disk as this process sees it: its record, and a device if it is usable."""

    record: DiskRecord
    geometry: DiskGeometry
    device: Device | None
    path: str
    # Blocks that failed their checksum this session (the "failing" threshold; the
    # counters in `errors` span mounts).
    session_checksum_errors: int = 0
    # The device of a disk out of service, still open (found at open, or kept when it
    # failed): what `disk online` re-admits once it works again.
    returned: Device | None = None

    @property
    def errors(self) -> dict[str, int]:
        """I/O errors by kind (read, write, checksum), kept in the disk record: they are
        committed with the metadata and survive mounts until `disk clear`."""
        return self.record.errors

    @property
    def usable(self) -> bool:
        return self.device is not None and self.record.state in USABLE_STATES

    @property
    def allocatable(self) -> bool:
        # A resyncing disk takes new slabs: their extents are zeroed, so current at once. A
        # failing one too: it is a warning (replace it), and a pool of exactly the layout's
        # width could otherwise place nothing.
        return self.device is not None and self.record.state in ALLOCATABLE_STATES


def make_private(device: Device) -> None:
    """An image file holds volume data: mode 0600 before it becomes a member, so no other
    user reads a volume through it (or locks it under the pool). A block device keeps the
    permissions its device node was given."""
    inner: object = device
    for _ in range(4):  # through wrappers (fault injection, the crash tests' power rail)
        if isinstance(inner, FileDevice) or not hasattr(inner, "inner"):
            break
        inner = inner.inner
    if not isinstance(inner, FileDevice) or inner.is_block:
        return
    try:
        if stat.S_IMODE(os.fstat(inner.fileno()).st_mode) != 0o600:
            os.fchmod(inner.fileno(), 0o600)
    except OSError as error:
        raise DeviceError(f"{device.path}: cannot make it private (mode 0600): "
                          f"{error.strerror}") from None


def error_kind(what: str) -> str:
    """The counter a failed device request of `what` ("checksum read", "flush", ...) goes
    to: reads are reads, everything that changes the disk (writes, zeroing, flushes) is a
    write."""
    return "read" if "read" in what else "write"


async def reserve_head(device: Device, geometry: DiskGeometry) -> None:
    """Host room for the labels, metadata and intent slots of a sparse image, allocated at
    once: commits and intent records then never need new room on the host, so a full host
    file system cannot stop the pool from recording its state (README, "Disks and
    failures"). HostSpaceError if there is not even that."""
    await trio.to_thread.run_sync(device.reserve_sync, 0, geometry.data_start)
    await trio.to_thread.run_sync(device.reserve_sync, geometry.backup_label_offset, LABEL_SIZE)


def read_label(device: Device) -> DiskLabel | None:
    """The disk's label (primary, else backup); None if it carries no Blockspace label."""
    primary = device.read_sync(0, LABEL_SIZE)
    backup_offset = (device.size // BLOCK) * BLOCK - LABEL_SIZE
    backup = device.read_sync(backup_offset, LABEL_SIZE) if backup_offset > 0 else b""
    if len(backup) != LABEL_SIZE:
        return decode_label(primary)
    return pick_label(primary, backup)


class Pool:
    def __init__(self, metadata: PoolMetadata, disks: dict[int, PoolDisk],
                 journal: JournalPosition | None = None,
                 in_use: ExtentsInUse | None = None) -> None:
        """`in_use`: the extents `metadata` maps, as its validation counted them (fresh
        sets this pool keeps); None: counted here."""
        self.metadata = metadata
        self.disks = disks
        self._commit_lock = trio.Lock()
        # Where the next metadata record goes; unknown: the first commit checkpoints.
        self.journal = journal if journal is not None else JournalPosition(
            slot=metadata.generation % 2, base=-1, tail=0, version=1, force_checkpoint=True)
        self._commit_requests = 0  # commits asked for so far (their changes are in memory)
        self._committed_through = 0  # every one of those up to here is durable
        # Why the last commit failed (cleared by the next that succeeds): `pool status`.
        self.metadata_error = ""
        self.reserve = MIN_RESERVE
        extent_counts = {disk_id: disk.record.extent_count for disk_id, disk in disks.items()}
        if in_use is not None:
            self.allocator = ExtentAllocator.counted(extent_counts, in_use)
        else:
            self.allocator = ExtentAllocator(extent_counts, metadata.used_extents())
        self.checksums = ChecksumStore(self.device, self.checksum_offset)
        self.intent: IntentLog | None = None  # enabled by the daemon (enable_intent_log)
        self.on_disk_failed: Callable[[int], None] | None = None  # the daemon starts a repair
        # The daemon's event log (blockspace/events/bus.py): on_event(class, **fields).
        self.on_event: Callable[..., None] | None = None
        self.io_timeout = DEFAULT_IO_TIMEOUT  # a disk silent for this long is failed
        self.recovering: set[IntentKey] = set()  # dirty at the last unclean stop
        self._last_seq = 0
        # Disks whose state changed in memory but no committed generation records yet.
        self._unsaved_states: set[int] = set()
        self.writes_in_flight: dict[int, int] = {}  # write sequence number -> count
        self.evacuating: set[int] = set()  # disks a running rebuild is emptying
        # Extents of a returning disk not resynced yet: treated as absent by all I/O.
        self.resyncing: set[Extent] = set()
        # Disks whose host file system had no room for a write (ENOSPC/EDQUOT), and why:
        # shown by `pool status` until a data write to the disk succeeds again. Not a fault
        # of the disk: nothing is marked failed for it.
        self.host_full: dict[int, str] = {}
        self.host_space_errors = 0  # how many writes were refused so, ever (never decreases)
        self_test_once("xxh3")
        self.record_codecs()

    def next_seq(self) -> int:
        """A write sequence number: larger than any before, across restarts (a hybrid
        clock: wall-clock nanoseconds, but never going backwards in this process)."""
        self._last_seq = max(self._last_seq + 1, time.time_ns())
        return self._last_seq

    # ---- creation and opening -------------------------------------------------------

    @classmethod
    async def create(
        cls,
        name: str,
        devices: Sequence[Device],
        *,
        media: Sequence[str],
        slab_size: int = DEFAULT_SLAB_SIZE,
        meta_slot_size: int | None = None,
    ) -> "Pool":
        """Label `devices` as a new pool. Validates everything before the first write.
        `meta_slot_size`: by default the larger of 4 MiB and what the pool's largest state
        needs (`min_slot_size`); a size given that cannot hold it is refused."""
        self_test_once("xxh3")
        validate_name("pool", name)
        if not devices:
            raise InvalidInput("a pool needs at least one disk")
        if len(media) != len(devices) or any(m not in MEDIA for m in media):
            raise InvalidInput(f"media must be one of {', '.join(MEDIA)}")
        needed = required_slot_size([d.size for d in devices], slab_size,
                                    [d.path for d in devices], media)
        if meta_slot_size is None:
            meta_slot_size = max(DEFAULT_META_SLOT_SIZE, needed)
        check_slot_size(meta_slot_size, needed, "pool")
        geometries = [compute_geometry(d.size, slab_size, meta_slot_size) for d in devices]
        pool_uuid = str(uuid.uuid4())
        now = time.time()
        records = []
        disks: dict[int, PoolDisk] = {}
        labels = []
        for disk_id, (device, geometry, medium) in enumerate(
            zip(devices, geometries, media, strict=True)
        ):
            disk_uuid = str(uuid.uuid4())
            record = DiskRecord(
                disk_id=disk_id,
                disk_uuid=disk_uuid,
                path_hint=device.path,
                size=device.size,
                extent_count=geometry.extent_count,
                media=medium,
            )
            records.append(record)
            disks[disk_id] = PoolDisk(record, geometry, device, device.path)
            labels.append(
                DiskLabel(pool_uuid, name, disk_uuid, disk_id, medium, geometry, created=now)
            )
        metadata = PoolMetadata(
            pool_uuid=pool_uuid,
            name=name,
            generation=0,
            slab_size=slab_size,
            meta_slot_size=meta_slot_size,
            disks=records,
            volumes=[],
            next_disk_id=len(devices),
        )
        image = encode_checkpoint(metadata, meta_slot_size)
        for device in devices:
            make_private(device)
        for device, geometry in zip(devices, geometries, strict=True):
            await reserve_head(device, geometry)
        for disk, label in zip(disks.values(), labels, strict=True):
            assert disk.device is not None
            raw_label = encode_label(label)
            geometry = disk.geometry
            # Both slots hold generation 0, so no stale slot of an earlier pool can win.
            await disk.device.write(geometry.meta_slot_offset(0), image)
            await disk.device.write(geometry.meta_slot_offset(1), image)
            await disk.device.write(geometry.backup_label_offset, raw_label)
            await disk.device.flush()
            # The primary label goes last: a disk is a member only once all else is there.
            await disk.device.write(0, raw_label)
            await disk.device.flush()
        log.info("created pool %s (%s) on %d disks", name, pool_uuid, len(devices))
        return cls(metadata, disks, JournalPosition(0, 0, len(image), 2, set(disks)))

    @classmethod
    async def open(
        cls, devices: Sequence[Device], *, expect_uuid: str | None = None, expect_name: str = ""
    ) -> "Pool":
        """Open a pool from whichever of its disks are present.

        Disks without our label or of another pool are ignored; the newest metadata
        generation found on any member wins.
        """
        members: list[tuple[Device, DiskLabel]] = []
        for device in devices:
            try:
                label = read_label(device)
            except (FormatError, DeviceError) as error:
                log.warning("%s: label unreadable: %s", device.path, error)
                continue
            if label is None:
                continue
            if expect_uuid is not None and label.pool_uuid != expect_uuid:
                continue
            if expect_uuid is None and expect_name and label.pool_name != expect_name:
                continue
            members.append((device, label))
        if not members:
            raise BlockspaceError("no disk of this pool was found")
        pool_uuids = {label.pool_uuid for _, label in members}
        if len(pool_uuids) > 1:
            raise BlockspaceError("the disks given belong to more than one pool")
        pool_uuid = pool_uuids.pop()
        _check_identities(members)
        problems: list[str] = []
        scans = [scan_member(device, label, pool_uuid, problems) for device, label in members]
        metadata, journal, in_use = load_newest(members, scans, pool_uuid, problems)
        newest = metadata.generation
        sealed = any(scan.sealed and scan.newest == newest for scan in scans)
        disks: dict[int, PoolDisk] = {}
        by_uuid = {label.disk_uuid: (device, label, scan)
                   for (device, label), scan in zip(members, scans, strict=True)}
        stale: list[int] = []
        for record in metadata.disks:
            found = by_uuid.get(record.disk_uuid)
            if found is None:
                geometry = compute_geometry(
                    record.size, metadata.slab_size, metadata.meta_slot_size
                )
                disks[record.disk_id] = PoolDisk(record, geometry, None, record.path_hint)
                continue
            device, label, scan = found
            short = size_problem(label.geometry, device.size)
            if short is not None:  # never served: its end is gone (or was never there)
                if record.state in USABLE_STATES:
                    _take_out_short(record, short)
                    stale.append(record.disk_id)
                disks[record.disk_id] = PoolDisk(record, label.geometry, None, device.path)
                continue
            check_record(record, label, metadata, device.path)
            if record.state in USABLE_STATES:
                reason = stale_reason(scan, newest, sealed)
                if reason is not None:
                    own_state(device, label, scan, pool_uuid)
                    _take_out_stale(record, scan, reason)
                    stale.append(record.disk_id)
            usable = record.state in USABLE_STATES
            disks[record.disk_id] = PoolDisk(
                record, label.geometry, device if usable else None, device.path,
                returned=None if usable else device,
            )
        journal.disks &= {d for d, disk in disks.items() if disk.usable}
        pool = cls(metadata, disks, journal, in_use)
        pool._unsaved_states.update(stale)
        for disk_id, disk in disks.items():
            if disk.record.state == "resyncing":  # interrupted: every extent again
                pool.resyncing.update(pool.extents_of(disk_id))
        return pool

    # ---- metadata -------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.metadata.name

    @property
    def uuid(self) -> str:
        return self.metadata.pool_uuid

    @property
    def slab_size(self) -> int:
        return self.metadata.slab_size

    def usable_disk_ids(self) -> list[int]:
        """Disks new data may go to."""
        return [disk_id for disk_id, disk in self.disks.items() if disk.allocatable]

    def unusable_disk_ids(self) -> list[int]:
        """Disks new data must not go to (out of service, or retiring)."""
        return [disk_id for disk_id, disk in self.disks.items() if not disk.allocatable]

    def tier_slots(self) -> int:
        """The ssd slots the tier maps of the pool's tiered volumes may use."""
        slots = 0
        for volume in self.metadata.volumes:
            if volume.tiers is not None:
                ssd = next((v for v in self.metadata.volumes if v.name == volume.tiers.ssd),
                           None)
                slots += ssd.size // volume.tiers.unit if ssd is not None else 0
        return slots

    def required_slot_size(self, *, extra_disk: tuple[Device, str] | None = None,
                           extra_tier_slots: int = 0) -> int:
        """The metadata slot this pool needs (`required_slot_size`), with a disk or the
        slots of a tiered volume about to be added."""
        records = [d.record for d in self.disks.values()]
        sizes = [r.size for r in records]
        paths = [r.path_hint for r in records]
        media = [r.media for r in records]
        if extra_disk is not None:
            sizes.append(extra_disk[0].size)
            paths.append(extra_disk[0].path)
            media.append(extra_disk[1])
        return required_slot_size(sizes, self.slab_size, paths, media,
                                  self.tier_slots() + extra_tier_slots)

    def media_excluded(self, volume: VolumeRecord) -> list[int]:
        """The disks of the other media class, when `volume` is one tier of a tiered
        volume (blockspace/tiering/tiered_volume.py): an ssd tier's slabs go to ssd disks only."""
        for parent in self.metadata.volumes:
            tiers = parent.tiers
            if tiers is not None and volume.name in (tiers.ssd, tiers.hdd):
                media = "ssd" if volume.name == tiers.ssd else "hdd"
                return [d for d, disk in self.disks.items() if disk.record.media != media]
        return []

    def record_codecs(self) -> None:
        """Every parity volume records its erasure code: one recorded before the field
        existed (or a new one) takes this host's default, written by the next commit. Each
        code must load here (BackendMissing, naming what to install) and give its known
        answers (SelfTestFailed)."""
        for volume in self.metadata.volumes:
            spec = LayoutSpec.from_dict(volume.layout)
            if spec.kind != "parity" or volume.tiers is not None:
                continue
            codec = volume.codec
            try:
                if codec is None:
                    codec = CodecInfo(LIBRARY, default_backend(spec.columns, spec.parity),
                                      spec.columns, spec.parity, FRAGMENT_FORMAT)
                key = (codec.library, codec.ec_type, codec.k, codec.m, codec.fragments)
                if key not in _CODECS_CHECKED:
                    check_backend(*key)
                    _CODECS_CHECKED.add(key)
            except BackendMissing as error:
                raise BackendMissing(f"pool {self.name!r} volume {volume.name!r}: "
                                     f"{error}") from None
            self_test_once(codec.ec_type)
            volume.codec = codec

    async def commit(self, *, seal: bool = False) -> None:
        """Make the metadata as it is in memory durable on every usable disk: the next
        generation, one journal record of what changed (or a checkpoint of the whole
        state), each disk's copy flushed.

        Group commit: a caller whose change a commit started after it already recorded
        returns at once; the others ride the next one. With `seal` (at mount and at a clean
        stop) a seal record follows once the generation is on every disk: it proves the
        generation reached them all, so a disk found with anything older is stale (see
        `stale_reason`)."""
        self.record_codecs()  # a volume added since (a tier's, or created) records its code
        self._commit_requests += 1
        ticket = self._commit_requests
        async with self._commit_lock:
            if self._committed_through >= ticket and not seal:
                return
            covered = self._commit_requests
            try:
                await self._commit_locked(seal)
            except BaseException as error:
                self.metadata_error = f"a metadata commit failed: {error}"[:300]
                raise
            self.metadata_error = ""
            self._committed_through = covered

    def _take_dirty(self) -> tuple[dict[str, set[int]], dict[str, set[int]]]:
        slabs: dict[str, set[int]] = {}
        units: dict[str, set[int]] = {}
        for volume in self.metadata.volumes:
            if isinstance(volume.slabs, TrackedMap) and volume.slabs.dirty:
                slabs[volume.uuid] = volume.slabs.take_dirty()
            tiers = volume.tiers
            if tiers is not None and isinstance(tiers.map, TrackedMap) and tiers.map.dirty:
                units[volume.uuid] = tiers.map.take_dirty()
        return slabs, units

    def _give_back(self, slabs: dict[str, set[int]], units: dict[str, set[int]]) -> None:
        for volume in self.metadata.volumes:
            if volume.uuid in slabs and isinstance(volume.slabs, TrackedMap):
                volume.slabs.mark_dirty(slabs[volume.uuid])
            tiers = volume.tiers
            if volume.uuid in units and tiers is not None and isinstance(tiers.map, TrackedMap):
                tiers.map.mark_dirty(units[volume.uuid])

    async def _commit_locked(self, seal: bool) -> None:
        slot_size = self.metadata.meta_slot_size
        while True:
            journal = self.journal
            targets = [d for d in self.disks.values() if d.usable]
            if not targets:
                raise DeviceError("no usable disk left to hold the pool metadata")
            saving = set(self._unsaved_states)
            # A disk leaving service is always recorded: only other commits keep the reserve.
            # So is the conversion of a version-1 pool whose state fits its (older, maybe
            # smaller) slot at all: refusing it would leave the pool unmountable.
            reserve = 0 if saving or journal.version == 1 else self.reserve
            self.metadata.generation += 1
            generation = self.metadata.generation
            slabs, units = self._take_dirty()
            wrote = False
            try:
                record = b""
                ids = {d.record.disk_id for d in targets}
                # A disk out of service misses records: back, it needs a checkpoint first.
                journal.disks &= ids
                if journal.version == 2 and not journal.force_checkpoint and ids <= journal.disks:
                    record = encode_record(self.metadata, journal.base, slabs, units)
                    if journal.tail + len(record) + reserve > slot_size:
                        record = b""  # the journal is full: checkpoint instead
                failed: list[tuple[int, DeviceError]] = []
                if record:
                    offset, slot = journal.tail, journal.slot
                    self.reserve = max(self.reserve, 2 * len(record))  # never shrinks
                    wrote = True
                    await self._write_all(targets, slot, offset, record, failed)
                    journal.tail += len(record)
                else:
                    image = await self._encode_checkpoint(reserve)
                    slot = 1 - journal.slot
                    wrote = True
                    await self._write_all(targets, slot, 0, image, failed)
                    journal = self.journal = JournalPosition(slot, generation, len(image), 2,
                                                             set(ids))
                journal.disks -= {disk_id for disk_id, _ in failed}
                if not failed and seal:
                    seal_record = encode_seal(self.metadata.pool_uuid, generation, journal.base)
                    if journal.tail + len(seal_record) <= slot_size:
                        await self._write_all(targets, journal.slot, journal.tail, seal_record,
                                              failed)
                        journal.tail += len(seal_record)
                        journal.disks -= {disk_id for disk_id, _ in failed}
                    else:  # no room for the seal: a checkpoint of the same state next time
                        journal.force_checkpoint = True
            except BaseException:
                if wrote:  # on some disks, perhaps: a checkpoint makes them agree again
                    self.journal.force_checkpoint = True
                else:
                    self.metadata.generation -= 1
                self._give_back(slabs, units)
                raise
            if not failed:
                self._unsaved_states -= saving
                return
            self.journal.force_checkpoint = True  # not on every disk: they must agree again
            broken = [(d, e) for d, e in failed if not isinstance(e, HostSpaceError)]
            if len(broken) == len(targets):
                raise DeviceError(f"pool metadata could not be written: {failed[0][1]}")
            if not broken:
                # No room on a host file system: the disk is fine, but this generation is
                # not on every disk in service, so the change it holds is refused.
                raise HostSpaceError(f"pool metadata could not be written: {failed[0][1]}")
            # Record the failed disks in a new generation on the survivors.
            for disk_id, error in broken:
                self._set_state(disk_id, "failed", str(error))

    async def _encode_checkpoint(self, reserve: int) -> bytes:
        """The whole state as a checkpoint, encoded (and validated and compressed) in a
        worker thread from a snapshot: only the snapshot's dict copies run here."""
        copy = snapshot(self.metadata)
        slot_size = self.metadata.meta_slot_size
        image = await trio.to_thread.run_sync(encode_checkpoint, copy, slot_size)
        if len(image) + reserve > slot_size:
            raise NoSpace(f"pool metadata ({len(image)} bytes) leaves less than the "
                          f"{reserve} bytes kept for recording a disk failure in the "
                          f"metadata area ({slot_size} bytes)")
        return image

    async def _write_all(self, targets: list[PoolDisk], slot: int, offset: int, data: bytes,
                         failed: list[tuple[int, DeviceError]]) -> None:
        async with trio.open_nursery() as nursery:
            for disk in targets:
                nursery.start_soon(self._write_metadata, disk, slot, offset, data, failed)

    async def _write_metadata(
        self, disk: PoolDisk, slot: int, offset: int, data: bytes,
        failed: list[tuple[int, DeviceError]],
    ) -> None:
        where = disk.geometry.meta_slot_offset(slot) + offset

        async def write(device: Device) -> None:
            await device.write(where, data)
            await device.flush()

        try:
            await self.disk_io(disk, "metadata write", write)
            self.note_written(disk.record.disk_id)
        except HostSpaceError as error:
            self.note_host_full(disk.record.disk_id, error)
            failed.append((disk.record.disk_id, error))
        except DeviceError as error:
            self.count_device_error(disk.record.disk_id, "write")
            failed.append((disk.record.disk_id, error))

    async def disk_io(
        self, disk: PoolDisk, what: str, op: Callable[[Device], Awaitable[T]], *,
        device: Device | None = None, attempts: int = 1, shield: bool = False,
        fail_on_timeout: bool = False, offset: int | None = None, length: int | None = None,
    ) -> T:
        """Every device call's bound: run `op` on `device` (by default the disk's device as
        it is now: a concurrent failure may have taken it away), each attempt within the I/O
        timeout. A DeviceError is retried until `attempts` calls have failed, then raised;
        no answer in time raises DeviceError at once. `shield`: the call is not cancelled
        with its caller, only by the timeout. `fail_on_timeout`: a disk that does not answer
        is taken out of service, durably, before the error is raised. `offset` and `length`
        (on the disk) go into the log line of a failed attempt."""
        disk_id = disk.record.disk_id
        if device is None:
            device = disk.device
        if device is None:
            raise DeviceError(f"disk {disk_id} is out of service")
        timeout = self.io_timeout
        for attempt in range(attempts):
            with trio.CancelScope(deadline=trio.current_time() + timeout, shield=shield) as scope:
                try:
                    return await op(device)
                except HostSpaceError:
                    raise  # retrying cannot make room on the host
                except DeviceError as error:
                    if attempt + 1 == attempts:
                        raise  # the caller counts the error it gives up on
                    # A retried error is an error of the disk all the same: counted.
                    self.count_device_error(disk_id, error_kind(what))
                    # One rate-limit key per disk and kind: a storm on one disk does not
                    # hide the first errors of another (service/logging_setup.py).
                    log.warning("%s; retrying (attempt %d of %d)",
                                io_error_line(disk_id, what, offset, length, error),
                                attempt + 2, attempts,
                                extra={"ratelimit_key": ("io-retry", disk_id, what)})
                    await trio.sleep(0.01 * (attempt + 1))
                    continue
            if scope.cancelled_caught:
                reason = f"no answer to a {what} within {timeout:g}s"
                if not fail_on_timeout:
                    raise DeviceError(reason)
                with trio.CancelScope(shield=shield):
                    await self.mark_failed(disk_id, reason)
                raise DeviceError(f"disk {disk_id}: {reason}")
        raise AssertionError("unreachable")

    def note_host_full(self, disk_id: int, error: HostSpaceError) -> None:
        """A write to this disk found no room on its host file system: remembered for
        `pool status` (and logged once), never counted against the disk."""
        self.host_space_errors += 1
        if disk_id not in self.host_full:
            log.warning("disk %d (%s): the host file system under it is full, writes that "
                        "need new space fail with ENOSPC: %s", disk_id,
                        self.disks[disk_id].path, error)
        self.host_full[disk_id] = str(error)

    def note_written(self, disk_id: int) -> None:
        """A write to this disk succeeded: if its host was full, it has room again, unless
        the host says otherwise (an overwrite of allocated blocks needs no room)."""
        if self.host_full and disk_id in self.host_full:
            device = self.disks[disk_id].device
            room = device.host_room() if device is not None else None
            if room is None or room >= HOST_ROOM:
                del self.host_full[disk_id]
                log.info("disk %d (%s): writes succeed again, the host file system has room",
                         disk_id, self.disks[disk_id].path)

    def check_host_room(self) -> None:
        """Forget the full-host condition of disks whose host has room again (`pool
        status`: the condition is shown while it lasts)."""
        for disk_id in list(self.host_full):
            device = self.disks[disk_id].device
            room = device.host_room() if device is not None else None
            if room is not None and room >= HOST_ROOM:
                self.note_written(disk_id)

    def count_device_error(self, disk_id: int, kind: str) -> None:
        """One more failed device request of `kind` ("read" or "write") on this disk, as
        `pool status` reports them (checksum errors: `count_checksum_errors`). Kept in the
        disk record, so the next commit makes it durable."""
        disk = self.disks.get(disk_id)
        if disk is not None:
            disk.errors[kind] += 1

    async def clear_errors(self, disk_id: int) -> None:
        """`disk clear`: reset a disk's error counters (durably); a disk that was only
        "failing" (the checksum error warning) is online again."""
        disk = self.disks[disk_id]
        old, old_session = dict(disk.errors), disk.session_checksum_errors
        old_state = (disk.record.state, disk.record.state_reason, disk.record.state_since)
        disk.errors.update(dict.fromkeys(disk.errors, 0))
        disk.session_checksum_errors = 0
        if disk.record.state == "failing":
            self._set_state(disk_id, "online", "error counters cleared")
        try:
            await self.commit()
        except BaseException:
            disk.errors.update(old)
            disk.session_checksum_errors = old_session
            (disk.record.state, disk.record.state_reason, disk.record.state_since) = old_state
            raise

    # ---- write-intent log -------------------------------------------------------------

    async def enable_intent_log(self) -> set[IntentKey]:
        """Start tracking writes in flight; returns the regions an unclean stop left dirty."""
        members = [(d.device, d.geometry) for d in self.disks.values() if d.device is not None]
        generation, recorded, base = read_intent(members, self.uuid)
        interleaves = {volume_key(v.uuid): LayoutSpec.from_dict(v.layout).interleave
                       for v in self.metadata.volumes}
        dirty = rescale(recorded, base, interleaves)  # the same keys when base is today's
        self.intent = IntentLog(self._persist_intent, self.flush, generation, dirty)
        self.intent.hold(dirty)
        self.recovering = set(dirty)
        if dirty:
            log.warning("pool %s was not stopped cleanly: %d regions to resync",
                        self.name, len(dirty))
        return dirty

    async def close_intent_log(self) -> None:
        """Clean stop: flush, record only what is still awaiting resync (when the intent
        log is on), then a sealed generation: a copy of a disk taken before now is older
        than it, and stale when it comes back (`stale_reason`)."""
        await self.flush()
        if self.intent is not None:
            self.intent.generation += 1
            await self._persist_intent(self.intent.generation, set(self.recovering))
        await self.commit(seal=True)

    async def _persist_intent(self, generation: int, keys: set[IntentKey]) -> None:
        record = encode_intent(generation, self.uuid, keys)
        targets = [d for d in self.disks.values() if d.usable]
        failed: list[tuple[int, DeviceError]] = []

        async def write_one(disk: PoolDisk) -> None:
            async def write(device: Device) -> None:
                await device.write(disk.geometry.intent_slot_offset(generation % 2), record)
                await device.flush()

            try:
                await self.disk_io(disk, "write-intent write", write)
                self.note_written(disk.record.disk_id)
            except HostSpaceError as error:
                self.note_host_full(disk.record.disk_id, error)
                failed.append((disk.record.disk_id, error))
            except DeviceError as error:
                self.count_device_error(disk.record.disk_id, "write")
                failed.append((disk.record.disk_id, error))

        await run_all([bind(write_one, disk) for disk in targets])
        if len(failed) == len(targets):
            raise failed[0][1] if all(isinstance(e, HostSpaceError) for _, e in failed) \
                else DeviceError("the write-intent log could not be written to any disk")
        full = [error for _, error in failed if isinstance(error, HostSpaceError)]
        for disk_id, error in failed:
            if not isinstance(error, HostSpaceError):
                await self.mark_failed(disk_id, str(error))
        if full:
            # The disk is fine, but the record is not on it: the write that needs it fails.
            raise HostSpaceError(f"the write-intent log could not be written: {full[0]}")

    def _set_state(self, disk_id: int, state: str, reason: str) -> None:
        disk = self.disks[disk_id]
        if disk.record.state != state:
            level = logging.ERROR if state in ("failed", "missing", "failing") else logging.INFO
            log.log(level, "disk %d (%s) is now %s: %s", disk_id, disk.path, state, reason)
            disk.record.state_since = time.time()
            self._unsaved_states.add(disk_id)
            self._event("disk_state", disk=disk_id, path=disk.path, old_state=disk.record.state,
                        state=state, reason=reason[:200])
            if disk.record.state in USABLE_STATES and state not in USABLE_STATES:
                # A disk leaving in the middle of a resync still misses the older writes.
                since = self.away_since()
                old = disk.record.missed_since
                disk.record.missed_since = min(old, since) if old else since
        disk.record.state = state
        disk.record.state_reason = reason[:200].replace("\n", " ")
        if state not in USABLE_STATES:
            if disk.device is not None:
                disk.returned = disk.device
            disk.device = None
        if state in ("failed", "missing") and self.on_disk_failed is not None:
            self.on_disk_failed(disk_id)

    def _event(self, event_class: str, **fields: object) -> None:
        if self.on_event is not None:
            self.on_event(event_class, **fields)

    async def set_state(self, disk_id: int, state: str, reason: str) -> None:
        self._set_state(disk_id, state, reason)
        await self.commit()

    # ---- membership -----------------------------------------------------------------

    async def add_disk(self, device: Device, media: str) -> PoolDisk:
        """Label `device` and make it a member; usable at once. The caller has checked that
        it belongs to no pool."""
        if media not in MEDIA:
            raise InvalidInput(f"media must be one of {', '.join(MEDIA)}")
        geometry = compute_geometry(device.size, self.slab_size, self.metadata.meta_slot_size)
        needed = self.required_slot_size(extra_disk=(device, media))
        check_slot_size(self.metadata.meta_slot_size, needed, "pool with the new disk")
        disk_id = self.metadata.next_disk_id
        disk_uuid = str(uuid.uuid4())
        record = DiskRecord(
            disk_id=disk_id, disk_uuid=disk_uuid, path_hint=device.path, size=device.size,
            extent_count=geometry.extent_count, media=media, state_since=time.time(),
        )
        label = DiskLabel(self.uuid, self.name, disk_uuid, disk_id, media, geometry,
                          created=time.time())
        make_private(device)
        # No stale metadata or intent record of an earlier life may be read back from it.
        await device.zero(0, geometry.data_start)
        await reserve_head(device, geometry)
        disk = PoolDisk(record, geometry, device, device.path)
        self.disks[disk_id] = disk
        self.metadata.disks.append(record)
        self.metadata.next_disk_id += 1
        self.allocator.add_disk(disk_id, geometry.extent_count)
        try:
            await self.commit()
        except BaseException:
            del self.disks[disk_id]
            self.metadata.disks.remove(record)
            self.metadata.next_disk_id -= 1
            self.allocator.remove_disk(disk_id)
            raise
        raw_label = encode_label(label)
        await device.write(geometry.backup_label_offset, raw_label)
        await device.flush()
        await device.write(0, raw_label)  # membership is complete once the label is there
        await device.flush()
        if self.intent is not None:
            await self._persist_intent(self.intent.generation, set(self.intent.durable))
        log.info("pool %s: added disk %d (%s)", self.name, disk_id, device.path)
        return disk

    def extents_on(self, disk_id: int) -> int:
        return sum(
            1 for volume in self.metadata.volumes for extents in volume.slabs.values()
            for d, _ in extents if d == disk_id
        )

    async def remove_disk(self, disk_id: int) -> None:
        """Forget an emptied disk and wipe its label, so it is no longer a member."""
        if self.extents_on(disk_id):
            raise InvalidInput(f"disk {disk_id} still holds data: retire it first")
        disk = self.disks.pop(disk_id)
        self.metadata.disks.remove(disk.record)
        self.allocator.remove_disk(disk_id)
        try:
            await self.commit()
        except BaseException:
            self.disks[disk_id] = disk
            self.metadata.disks.append(disk.record)
            self.allocator.add_disk(disk_id, disk.record.extent_count)
            raise
        # Whether in service or not (a retired or failed disk's device is kept as
        # `returned`): both label copies go, and the file is closed, so the same disk can
        # be added again, to this pool or another.
        device = disk.device or disk.returned
        # Both, if both are set (in service, and a copy kept for its return): a handle left
        # open keeps the file's lock, and `disk add` of it would find it "in use".
        spare = disk.returned if disk.returned is not device else None
        disk.device = disk.returned = None
        if spare is not None:
            spare.close()
        if device is None:
            log.warning("removed disk %d (%s) is not present: its label stays on it (`disk "
                        "add --force` overwrites it)", disk_id, disk.path)
        else:
            try:
                await device.zero(0, disk.geometry.data_start)
                await device.zero(disk.geometry.backup_label_offset, LABEL_SIZE)
                await device.flush()
            except DeviceError as error:
                log.warning("could not wipe the label of removed disk %d: %s", disk_id, error)
            finally:
                device.close()
        log.info("pool %s: removed disk %d (%s)", self.name, disk_id, disk.path)

    def find_disk(self, name: str) -> int:
        """A disk id from what a user typed: the id, or the disk's path."""
        if name.isdigit() and int(name) in self.disks:
            return int(name)
        wanted = os.path.realpath(name)
        for disk_id, disk in self.disks.items():
            if os.path.realpath(disk.path) == wanted or disk.record.path_hint == name:
                return disk_id
        raise InvalidInput(f"pool {self.name!r} has no disk {name!r} (use an id or path from "
                           "`pool status`)")

    async def mark_failed(self, disk_id: int, reason: str) -> None:
        """Take a disk out of service after a write error, durably, before the write that
        could not reach it is acknowledged."""
        if self.disks[disk_id].record.state != "failed":
            self._set_state(disk_id, "failed", reason)
        # Another task may have set the state and not committed it yet (or its commit was
        # cancelled): this write is acknowledged only once a generation records it.
        if disk_id in self._unsaved_states:
            await self.commit()

    async def count_checksum_errors(self, disk_id: int, blocks: int) -> None:
        """Blocks of this disk that failed their checksum; past a threshold the disk is
        "failing": it keeps serving (its copies are healed), and the pool asks for it to be
        replaced."""
        disk = self.disks[disk_id]
        disk.errors["checksum"] += blocks
        disk.session_checksum_errors += blocks
        self._event("checksum_error", disk=disk_id, path=disk.path, blocks=blocks,
                    total=disk.errors["checksum"])
        if (disk.session_checksum_errors >= FAILING_CHECKSUM_ERRORS
                and disk.record.state == "online"):
            self._set_state(disk_id, "failing",
                            f"{disk.session_checksum_errors} blocks failed their checksum")
            await self.commit()

    def away_since(self) -> int:
        """The write number from which a disk leaving service now may have missed writes:
        the oldest write still in flight (it may be retrying, and fail, on that disk)."""
        return min(self.writes_in_flight, default=self.next_seq())

    @contextmanager
    def write_in_flight(self) -> Iterator[int]:
        """A write sequence number, registered while the write runs."""
        seq = self.next_seq()
        self.writes_in_flight[seq] = self.writes_in_flight.get(seq, 0) + 1
        try:
            yield seq
        finally:
            self.writes_in_flight[seq] -= 1
            if not self.writes_in_flight[seq]:
                del self.writes_in_flight[seq]

    async def note_missing_disks(self) -> None:
        """Take the pool into service: record disks absent at mount (so a stale copy coming
        back is never trusted) and the write number this session starts from."""
        # An absent disk may have missed any write of the last session, none before it.
        previous = self.metadata.opened_seq
        missed_since = max(1, previous - CLOCK_MARGIN) if previous else 1
        for disk in self.disks.values():
            if disk.device is None and disk.record.state in USABLE_STATES:
                log.error("disk %d (%s) is missing", disk.record.disk_id, disk.path)
                self._event("disk_state", disk=disk.record.disk_id, path=disk.path,
                            old_state=disk.record.state, state="missing",
                            reason="not found at mount")
                disk.record.state = "missing"
                disk.record.state_reason = "not found at mount"
                disk.record.state_since = time.time()
                old = disk.record.missed_since
                disk.record.missed_since = min(old, missed_since) if old else missed_since
        self.metadata.opened_seq = self.next_seq()
        await self.commit(seal=True)

    # ---- extents --------------------------------------------------------------------

    def checksum_offset(self, disk_id: int, extent: int) -> int:
        return self.disks[disk_id].geometry.checksum_offset(extent)

    def extent_offset(self, disk_id: int, extent: int) -> int:
        return self.disks[disk_id].geometry.extent_offset(extent)

    def device(self, disk_id: int) -> Device | None:
        disk = self.disks.get(disk_id)
        return disk.device if disk is not None and disk.usable else None

    def extent_device(self, disk_id: int, extent: int, *, resync: bool = False) -> Device | None:
        """The device an extent is read and written through; None while the disk is out of
        service or the extent is awaiting its resync (unless `resync`: the resync itself)."""
        if not resync and (disk_id, extent) in self.resyncing:
            return None
        return self.device(disk_id)

    def extents_of(self, disk_id: int) -> list[Extent]:
        return [(d, e) for d, e in self.metadata.used_extents() if d == disk_id]

    async def _zero_extents(self, extents: Sequence[Extent]) -> None:
        """Zero new extents. A disk that fails to (dead, though nothing noticed yet) is
        failed, and its extent left absent like a degraded placement's."""

        async def zero(disk_id: int, extent: int) -> None:
            disk = self.disks[disk_id]
            offset = self.extent_offset(disk_id, extent)
            stride = disk.geometry.extent_stride

            async def op(device: Device) -> None:
                await device.zero(offset, stride)

            try:
                await self.disk_io(disk, "zeroing of a new extent", op)
            except HostSpaceError as error:  # the slab is not placed: the write gets ENOSPC
                self.note_host_full(disk_id, error)
                raise
            except DeviceError as error:
                self.count_device_error(disk_id, "write")
                await self.mark_failed(disk_id, str(error))

        jobs = []
        for disk_id, extent in extents:
            if self.device(disk_id) is not None:
                geometry = self.disks[disk_id].geometry
                self.checksums.forget_extent(disk_id, extent, geometry.checksum_area_size // BLOCK)
                jobs.append(bind(zero, disk_id, extent))
        await run_all(jobs)

    async def allocate_slabs(
        self, volume: VolumeRecord, slab_indexes: Sequence[int], *, degraded_ok: bool = False
    ) -> None:
        """Place new slabs of `volume`: zero their extents, then commit the map. With
        `degraded_ok` (one slab written into a thin volume) a slab that finds too few disks
        in service may leave up to its tolerance of extents on failed or missing disks,
        to be rebuilt with the others: writes within the tolerance keep succeeding."""
        spec = LayoutSpec.from_dict(volume.layout)
        try:
            placements = self.allocator.allocate_many(
                spec.width, len(slab_indexes),
                exclude=self.unusable_disk_ids() + self.media_excluded(volume),
            )
        except NoSpace:
            if not degraded_ok or len(slab_indexes) != 1:
                raise
            placements = [self._place_degraded(volume, spec, slab_indexes[0])]
        try:
            for placement in placements:
                await self._zero_extents(placement)
            await self.flush()  # the zeroes are durable before any map points at them
            for placement in placements:
                absent = sum(self.device(d) is None for d, _ in placement)
                if absent > spec.tolerance:
                    raise DeviceError(f"a new slab of volume {volume.name!r} lost {absent} "
                                      "disks while it was being placed")
            for index, placement in zip(slab_indexes, placements, strict=True):
                volume.slabs[index] = list(placement)
            await self.commit()
        except BaseException:
            for index in slab_indexes:
                volume.slabs.pop(index, None)
            self.allocator.release([e for placement in placements for e in placement])
            raise

    async def free_slabs(self, volume: VolumeRecord, slab_indexes: Sequence[int]) -> int:
        """Unmap slabs of a thin volume (a discard of them whole): they read as zeros from
        now on and a later write allocates afresh. The map without them is committed before
        their extents go back to the free space, so a crash leaves each slab mapped (its old
        content) or free, and no extent is handed to another slab while a durable map still
        points at it. The caller holds what keeps the slabs' I/O and allocation out (the
        volume's allocation lock and the slabs' row locks). Returns the slabs unmapped."""
        removed = {index: volume.slabs.pop(index) for index in slab_indexes
                   if index in volume.slabs}
        if not removed:
            return 0
        try:
            # Not cancelled half-way: a generation without the slabs may already be on some
            # disks, and the map in memory must then not claim them mapped.
            with trio.CancelScope(shield=True):
                await self.commit()
        except BaseException:
            volume.slabs.update(removed)
            raise
        freed = [extent for extents in removed.values() for extent in extents]
        self.allocator.release(freed)
        # A free extent holds nothing to catch up; it is zeroed again when reused.
        self.resyncing.difference_update(freed)
        for disk_id, extent in freed:
            pages = self.disks[disk_id].geometry.checksum_area_size // BLOCK
            self.checksums.forget_extent(disk_id, extent, pages)
        return len(removed)

    def _place_degraded(self, volume: VolumeRecord, spec: LayoutSpec, index: int) -> list[Extent]:
        out = [d for d, disk in self.disks.items() if disk.record.state in ("failed", "missing")]
        exclude = self.unusable_disk_ids() + self.media_excluded(volume)
        # Rather not on a disk a rebuild is emptying: the extent could not follow it there.
        for standby in ([d for d in out if d not in self.evacuating], out):
            try:
                live, absent = self.allocator.allocate_degraded(
                    spec.width, exclude=exclude, standby=standby, max_absent=spec.tolerance)
                break
            except NoSpace:
                if standby is out:
                    raise
        placement: list[Extent | None] = [None] * spec.width
        for position, extent in zip(absent_positions(spec, len(absent)), absent, strict=True):
            placement[position] = extent
        remaining = iter(live)
        extents = [extent if extent is not None else next(remaining) for extent in placement]
        log.warning("volume %s: slab %d placed degraded, its extents on disks %s wait for a "
                    "repair or replace", volume.name, index, [d for d, _ in absent])
        return extents

    # ---- volumes --------------------------------------------------------------------

    def slab_count(self, volume: VolumeRecord) -> int:
        spec = LayoutSpec.from_dict(volume.layout)
        per_slab = spec.slab_data_size(self.slab_size)
        return -(-volume.size // per_slab)

    async def create_volume(
        self, name: str, size: int, spec: LayoutSpec, provisioning: str
    ) -> VolumeRecord:
        validate_name("volume", name)
        if any(v.name == name for v in self.metadata.volumes):
            raise InvalidInput(f"volume {name!r} already exists in pool {self.name!r}")
        if provisioning not in ("thin", "fixed"):
            raise InvalidInput(f"provisioning must be thin or fixed, not {provisioning!r}")
        if size <= 0 or size % BLOCK:
            raise InvalidInput(f"volume size must be a positive multiple of 4K, not {size}")
        if size > MAX_VOLUME_SIZE:
            raise InvalidInput(f"volume size {format_size(size)} is larger than the "
                               f"{format_size(MAX_VOLUME_SIZE)} allowed")
        spec.validate(self.slab_size, len(self.usable_disk_ids()))
        record = VolumeRecord(
            name=name,
            uuid=str(uuid.uuid4()),
            size=size,
            layout=spec.to_dict(),
            provisioning=provisioning,
            slabs={},
            created=time.time(),
        )
        if provisioning == "fixed":
            needed = self.slab_count(record)
            self._check_fits(spec, needed, f"fixed volume of {format_size(size)}")
            self.metadata.volumes.append(record)
            try:
                await self.allocate_slabs(record, list(range(needed)))
            except BaseException:
                self.metadata.volumes.remove(record)
                raise
        else:
            self.metadata.volumes.append(record)
            try:
                await self.commit()
            except BaseException:
                self.metadata.volumes.remove(record)
                raise
        log.info("created volume %s/%s: %s, %d bytes, %s", self.name, name, spec.describe(),
                 size, provisioning)
        return record

    def _check_fits(self, spec: LayoutSpec, slabs: int, what: str) -> None:
        from blockspace.geometry.allocator import max_slabs
        from blockspace.units import format_size

        free = {d: n for d, n in self.allocator.free_map().items() if self.disks[d].allocatable}
        fits = max_slabs(free, spec.width)
        if fits < slabs:
            per_slab = spec.slab_data_size(self.slab_size)
            raise NoSpace(
                f"not enough free space for the {what}: {spec.describe()} can still place "
                f"{format_size(fits * per_slab)}, {format_size(slabs * per_slab)} needed"
            )

    async def delete_volume(self, name: str) -> None:
        volume = self.volume(name)
        self.metadata.volumes.remove(volume)
        try:
            await self.commit()
        except BaseException:
            self.metadata.volumes.append(volume)
            raise
        # Freed only after the map without them is durable; zeroed again on reuse.
        self.allocator.release([e for extents in volume.slabs.values() for e in extents])

    async def grow_volume(self, name: str, new_size: int) -> VolumeRecord:
        volume = self.volume(name)
        if new_size % BLOCK or new_size <= volume.size or new_size > MAX_VOLUME_SIZE:
            raise InvalidInput(
                "new size must be a multiple of 4K larger than the current "
                f"{format_size(volume.size)}"
            )
        old_size = volume.size
        old_slabs = self.slab_count(volume)
        volume.size = new_size
        try:
            if volume.provisioning == "fixed":
                spec = LayoutSpec.from_dict(volume.layout)
                new_slabs = list(range(old_slabs, self.slab_count(volume)))
                self._check_fits(spec, len(new_slabs), "volume growth")
                if new_slabs:
                    await self.allocate_slabs(volume, new_slabs)
                else:
                    await self.commit()
            else:
                await self.commit()
        except BaseException:
            volume.size = old_size
            raise
        return volume

    def volume(self, name: str) -> VolumeRecord:
        for volume in self.metadata.volumes:
            if volume.name == name:
                return volume
        raise InvalidInput(f"no volume {name!r} in pool {self.name!r}")

    async def flush(self) -> None:
        """fdatasync every usable disk. With none left, writes acknowledged into the disks'
        caches can never become durable: that flush fails, it does not succeed vacuously."""
        usable = [disk for disk in self.disks.values() if disk.usable]
        if not usable:
            raise DeviceError("no disk in service to flush: acknowledged writes may be lost")
        await run_all([bind(self._flush_one, disk) for disk in usable])

    async def _flush_one(self, disk: PoolDisk) -> None:
        async def flush(device: Device) -> None:
            await device.flush()

        try:
            await self.disk_io(disk, "flush", flush)
        except DeviceError as error:  # ENOSPC here too: writes it took may be lost
            self.count_device_error(disk.record.disk_id, "write")
            # The disk leaves service durably before this flush may report success, even
            # if another task marked it first: if no disk can take that record any more,
            # the commit raises and so does the flush.
            self._set_state(disk.record.disk_id, "failed", str(error))
            await self.commit()

    def close(self) -> None:
        for disk in self.disks.values():
            if disk.device is not None:
                disk.device.close()


def newest_metadata(members: list[tuple[Device, DiskLabel]], pool_uuid: str) -> PoolMetadata:
    """The newest valid metadata on any of `members` (FormatError if none has one)."""
    problems: list[str] = []
    scans = [scan_member(device, label, pool_uuid, problems) for device, label in members]
    return load_newest(members, scans, pool_uuid, problems)[0]


def required_slot_size(sizes: Sequence[int], slab_size: int, paths: Sequence[str],
                       media: Sequence[str], tier_slots: int = 0) -> int:
    """The smallest metadata slot a pool of disks of `sizes` (and `media`) needs
    (`min_slot_size`), counting each path hint as the metadata will record it (and room to
    grow), and tier maps of the ssd capacity in default units or of `tier_slots` slots,
    whichever is more."""
    path_bytes = sum(len(path.encode()) + 256 for path in paths)
    ssd = [size for size, kind in zip(sizes, media, strict=True) if kind == "ssd"]
    slots = max(tier_slots_bound(ssd, slab_size), tier_slots)
    return min_slot_size(sizes, slab_size, path_bytes, slots)


def check_slot_size(meta_slot_size: int, needed: int, what: str) -> None:
    """InvalidInput naming the minimum if the metadata area cannot hold the largest state."""
    if meta_slot_size < needed:
        from blockspace.units import format_size

        raise InvalidInput(
            f"the metadata area ({format_size(meta_slot_size)}, --metadata-size) is too small "
            f"for this {what}: the metadata of its capacity at this slab size may need "
            f"{format_size(needed)} ({needed} bytes)"
        )


def check_record(record: DiskRecord, label: DiskLabel, metadata: PoolMetadata, path: str) -> None:
    """The metadata's record of a disk must say what the disk's own label says: a map
    that places extents past a disk's end, or metadata slots of another size (crafted, or
    of another pool's history), is refused with one line rather than trusted."""
    geometry = label.geometry
    found = [
        (what, mine, theirs)
        for what, mine, theirs in (
            ("disk id", record.disk_id, label.disk_id),
            ("size", record.size, geometry.disk_size),
            ("extent count", record.extent_count, geometry.extent_count),
            ("slab size", metadata.slab_size, geometry.slab_size),
            ("metadata slot size", metadata.meta_slot_size, geometry.meta_slot_size),
        )
        if mine != theirs
    ]
    if found:
        what, mine, theirs = found[0]
        raise FormatError(
            f"{path}: the pool metadata (generation {metadata.generation}) gives disk "
            f"{record.disk_id} {what} {mine}, its label {theirs}: the metadata is damaged "
            "or crafted; not opened"
        )


def _check_identities(members: list[tuple[Device, DiskLabel]]) -> None:
    """One device per disk identity: a byte copy of a member beside the original would
    otherwise let whichever path came last speak for the disk."""
    seen: dict[str, Device] = {}
    for device, label in members:
        twin = seen.get(label.disk_uuid)
        if twin is not None:
            raise BlockspaceError(
                f"{twin.path} and {device.path} both carry disk {label.disk_id} of pool "
                f"{label.pool_name!r} (disk uuid {label.disk_uuid}): one is a copy of the "
                "other; give only the real disk"
            )
        seen[label.disk_uuid] = device


def _take_out_stale(record: DiskRecord, scan: SlotScan, reason: str) -> None:
    """Out of service until caught up. With readable metadata of its own it is "missing"
    (the mount's resume re-admits it through readmit, resyncing what it may have missed
    since the session it last took part in); without, "failed" (`disk online` rebuilds it
    whole, since nothing tells what it holds)."""
    since = max(1, scan.opened_seq - CLOCK_MARGIN) if scan.opened_seq else 1
    if scan.missed_since:  # it had been away already then
        since = min(since, scan.missed_since)
    old = record.missed_since
    record.missed_since = min(old, since) if old else since
    if scan.newest is None:
        record.state = "failed"
        reason += ": `disk online` re-admits it, rebuilding every extent"
    else:
        record.state = "missing"
        reason += ": it catches up at mount (or with `disk online`)"
    record.state_reason = reason
    record.state_since = time.time()
    # A warning: `pool status` shows the reason (an offline command prints errors only).
    log.warning("disk %d: %s", record.disk_id, reason)


def _take_out_short(record: DiskRecord, reason: str) -> None:
    """A device shorter than its label: failed, since what lay past its end is lost (or it
    is a copy of a label on a device that never held the disk)."""
    record.state = "failed"
    record.missed_since = 1  # it may lack any write ever made: a catch-up redoes them all
    record.state_reason = (f"{reason}; `disk replace` it, or restore its size and "
                           "`disk online` it (every extent is rebuilt)")
    record.state_since = time.time()
    log.warning("disk %d: %s", record.disk_id, record.state_reason)


def stale_reason(scan: SlotScan, newest: int, sealed: bool) -> str | None:
    """Why a member the metadata lists in service must not serve (None: it is fresh).

    Each disk holds the generation of the last commit it took part in. One generation behind
    is what a commit cut short by a crash leaves on the disks it had not reached yet (that
    commit was never acknowledged, and they hold every write); once a generation is sealed
    (written to both slots of every disk: at mount and at a clean stop) it reached them all,
    and anything older on a disk in service is a restored copy or a disk that was away."""
    mine = scan.newest
    if mine == newest or (mine == newest - 1 and not sealed):
        return None
    if mine is None:
        return (f"stale: no valid metadata copy on it, older than the pool's generation "
                f"{newest} for all we know")
    return (f"stale: its metadata is generation {mine}, older than the pool's {newest} "
            "(a restored copy, or away during commits)")
