"""Where the pool metadata lives on the disks: finding the newest state at open (slot
headers and journal records read and checked, one checkpoint decoded), and where the next
commit goes (the journal position every disk in it shares).

Format: blockspace/ondisk/journal.py. A commit appends one record to the active slot of
every disk in service; when the journal runs out of room, or a disk joins that does not hold
the active checkpoint, the whole state is checkpointed into the other slot (the previous
checkpoint and its journal stay intact until the new one is durable on every disk), and the
journal continues there.
"""

import logging
from dataclasses import dataclass, field

from blockspace.disks.devices import Device
from blockspace.errors import DeviceError, FormatError
from blockspace.ondisk.journal import Reader, SlotIndex, index_slot, replay, replay_counted
from blockspace.ondisk.label import BLOCK, DiskGeometry, DiskLabel
from blockspace.ondisk.metadata import ExtentsInUse, PoolMetadata

log = logging.getLogger(__name__)

# Room kept free in the journal for a record of a disk state change (a failed or missing
# disk): an ordinary commit that would leave less is refused (ENOSPC), never that one.
MIN_RESERVE = 8 * BLOCK


def slot_reader(device: Device, geometry: DiskGeometry, slot: int) -> Reader:
    """Reads within one metadata slot of `device` (short at the slot's end)."""
    start = geometry.meta_slot_offset(slot)
    size = geometry.meta_slot_size

    def read(offset: int, length: int) -> bytes:
        length = max(0, min(length, size - offset))
        return bytes(device.read_sync(start + offset, length)) if length else b""

    return read


@dataclass
class SlotScan:
    """What the metadata slots of one member hold: the newest generation of each valid
    slot, whether the newest is sealed (known to have reached every disk), and from its
    newest state what a catch-up needs (the session it last took part in, and since when
    it had been away then, if it had; filled in only for a disk found stale)."""

    generations: list[int]
    opened_seq: int = 0
    missed_since: int = 0
    sealed: bool = False
    indexes: dict[int, SlotIndex] = field(default_factory=dict)

    @property
    def newest(self) -> int | None:
        return max(self.generations, default=None)

    @property
    def newest_slot(self) -> int | None:
        if not self.indexes:
            return None
        return max(self.indexes, key=lambda s: (self.indexes[s].generation, s))


def scan_member(device: Device, label: DiskLabel, pool_uuid: str,
                problems: list[str]) -> SlotScan:
    """Index both slots of one member (headers and checksums; nothing decoded)."""
    scan = SlotScan([])
    geometry = label.geometry
    for slot in (0, 1):
        try:
            index = index_slot(slot_reader(device, geometry, slot), geometry.meta_slot_size,
                               pool_uuid)
        except (FormatError, DeviceError) as error:
            problems.append(f"{device.path} slot {slot}: {error}")
            continue
        scan.indexes[slot] = index
    _summarize(scan)
    return scan


def _summarize(scan: SlotScan) -> None:
    scan.generations = [index.generation for index in scan.indexes.values()]
    newest = scan.newest_slot
    if newest is None:
        scan.sealed = False
        return
    index = scan.indexes[newest]
    if index.checkpoint.version == 1:  # version 1 seals by writing both slots
        scan.sealed = scan.generations.count(index.generation) == 2
    else:
        scan.sealed = index.sealed


@dataclass
class JournalPosition:
    """Where the next record goes: the same place on every disk in `disks` (each holds the
    checkpoint `base` in `slot` and the journal up to `tail`). `version` 1: the pool is
    still in format 1, and its first commit converts it (a checkpoint)."""

    slot: int
    base: int
    tail: int
    version: int
    disks: set[int] = field(default_factory=set)
    # After a commit that failed part-way (records on some disks, not all), a checkpoint
    # makes every disk agree again.
    force_checkpoint: bool = False


def load_newest(
    members: list[tuple[Device, DiskLabel]], scans: list[SlotScan], pool_uuid: str,
    problems: list[str],
) -> tuple[PoolMetadata, JournalPosition, ExtentsInUse | None]:
    """The newest state on any member (one checkpoint decoded, its journal replayed), the
    journal position the disks that hold exactly it share, and the extents the state uses
    (`replay_counted`). A slot that fails to decode is dropped from its member's scan and
    the next newest is tried."""
    while True:
        candidates = sorted(
            ((index.generation, i, slot) for i, scan in enumerate(scans)
             for slot, index in scan.indexes.items()), reverse=True)
        if not candidates:
            raise FormatError("no valid copy of the pool metadata: " + "; ".join(problems))
        _, i, slot = candidates[0]
        device, label = members[i]
        index = scans[i].indexes[slot]
        try:
            md, in_use = replay_counted(slot_reader(device, label.geometry, slot), index,
                                        label.geometry.meta_slot_size, pool_uuid)
        except (FormatError, DeviceError) as error:
            problems.append(f"{device.path} slot {slot}: {error}")
            del scans[i].indexes[slot]
            _summarize(scans[i])
            continue
        break
    for problem in problems:
        log.info("ignored metadata copy: %s", problem)
    position = JournalPosition(slot, index.checkpoint.generation, index.tail,
                               index.checkpoint.version)
    for (_, other_label), scan in zip(members, scans, strict=True):
        other = scan.indexes.get(slot)
        if (scan.newest_slot == slot and other is not None and other.tail == index.tail
                and other.generation == index.generation
                and other.checkpoint.generation == index.checkpoint.generation):
            position.disks.add(other_label.disk_id)
    return md, position, in_use


def own_state(device: Device, label: DiskLabel, scan: SlotScan, pool_uuid: str) -> None:
    """Fill in `scan`'s catch-up fields from the member's own newest state (decoded only
    for a member found stale: the rare case)."""
    slot = scan.newest_slot
    if slot is None:
        return
    try:
        own = replay(slot_reader(device, label.geometry, slot), scan.indexes[slot],
                     label.geometry.meta_slot_size, pool_uuid)
    except (FormatError, DeviceError) as error:
        log.info("%s: own metadata unreadable: %s", device.path, error)
        return
    scan.opened_seq = own.opened_seq
    for record in own.disks:
        if record.disk_uuid == label.disk_uuid:
            scan.missed_since = record.missed_since
