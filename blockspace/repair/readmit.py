"""Re-admitting a disk that comes back after it failed or went missing: its catch-up.
(Not to be confused with the region resync after an unclean stop, volume/region_resync.py.)

Its extents catch up by what changed while it was away, not copied whole. What changed
is told by the write sequence numbers every checksum entry carries: the disk record keeps
`missed_since`, the write number from which it may have missed writes.

* A mirror extent is compared with the other copies entry by entry (16 bytes per 4 KiB,
  so the comparison reads 0.4% of the data); only ranges whose entries differ are read
  and merged, the newest valid copy winning, as a read's self-heal would.
* A parity extent gets every row rebuilt in which another column carries write
  `missed_since` or a later one; rows nobody wrote since are trusted as they are.
* An extent the disk did not hold when it left (a slab placed degraded while it was away,
  see Pool.allocate_slabs) holds leftovers: it is zeroed first, then rebuilt like the rest.
  What it held is read from the disk's own last metadata generation.
Each rule is its kind's `Redundancy.catch_up` (volume/mirror.py, volume/parity.py).

Until an extent has caught up it is in `Pool.resyncing`, so every read, write, scrub and
move treats it as absent. Each extent is done under its slab's row locks, so no write
races it. The disk is "resyncing" in the metadata for the whole time (the state keeps its
name): a restart starts again from the first extent (comparisons are cheap), and it turns
"online" at the end.
"""

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING

import trio

from blockspace.disks.devices import Device
from blockspace.errors import DeviceError, FormatError, InvalidInput
from blockspace.geometry.allocator import Extent
from blockspace.ondisk.checksums import CSUM_BLOCK
from blockspace.ondisk.metadata import PoolMetadata
from blockspace.volume.row_locks import column_rows

if TYPE_CHECKING:
    from blockspace.pool.pool import Pool
    from blockspace.repair.rebuild import RebuildProgress
    from blockspace.volume.volume import Volume

log = logging.getLogger(__name__)

RETURNING_STATES = ("failed", "missing")


def fresh_extents(md_now: PoolMetadata, md_then: PoolMetadata | None, disk_id: int) -> set[Extent]:
    """Extents of `disk_id` mapped now that did not hold the same slab position when the
    disk left (`md_then`, its own last metadata; None if unreadable: all of them)."""
    then: dict[tuple[str, int, int], int] = {}
    if md_then is not None:
        for volume in md_then.volumes:
            for slab, extents in volume.slabs.items():
                for position, (d, extent) in enumerate(extents):
                    if d == disk_id:
                        then[(volume.uuid, slab, position)] = extent
    fresh = set()
    for volume in md_now.volumes:
        for slab, extents in volume.slabs.items():
            for position, (d, extent) in enumerate(extents):
                if d == disk_id and then.get((volume.uuid, slab, position)) != extent:
                    fresh.add((d, extent))
    return fresh


def returning_order(pool: "Pool", disk_ids: Iterable[int]) -> list[int]:
    """The disks that left last come back first: for the slabs they share, the disk
    that stayed longer holds writes the other one missed."""
    return sorted(disk_ids, key=lambda d: (-pool.disks[d].record.missed_since, d))


def check_return_order(pool: "Pool", disk_ids: Iterable[int]) -> None:
    """InvalidInput if a disk that left later than one coming back, and shares slabs with
    it, stays out: the returning disk's catch-up would miss the writes only that one has."""
    coming = set(disk_ids)
    for disk_id in coming:
        since = pool.disks[disk_id].record.missed_since
        for other, disk in pool.disks.items():
            if other in coming or disk.record.state not in RETURNING_STATES:
                continue
            if disk.record.missed_since > since and _share_slabs(pool, disk_id, other):
                raise InvalidInput(
                    f"disk {other} left after disk {disk_id} and holds writes it missed: "
                    f"bring both back together (`disk online POOL {disk_id} {other}`), or "
                    f"disk {other} first"
                )


def _share_slabs(pool: "Pool", a: int, b: int) -> bool:
    return any(
        {a, b} <= {d for d, _ in extents}
        for volume in pool.metadata.volumes for extents in volume.slabs.values()
    )


async def prepare(pool: "Pool", disk_id: int, device: Device) -> int:
    """Check the returning device, zero its fresh extents and take it back in service as
    "resyncing". Returns how many extents await their catch-up. Nothing changes on error."""
    from blockspace.pool.pool import newest_metadata, read_label

    disk = pool.disks[disk_id]
    record = disk.record
    if record.state not in RETURNING_STATES:
        raise InvalidInput(
            f"disk {disk_id} is {record.state}: only a failed or missing disk can come back "
            "online"
        )
    label = read_label(device)
    if label is None or label.pool_uuid != pool.uuid or label.disk_uuid != record.disk_uuid:
        raise InvalidInput(
            f"{device.path} is not disk {disk_id} of pool {pool.name!r} (its label does not "
            "match); to use a new disk, `disk replace` it"
        )
    if device.size < record.size:
        raise InvalidInput(f"{device.path} is smaller than disk {disk_id} was")
    try:
        then: PoolMetadata | None = newest_metadata([(device, label)], pool.uuid)
    except (FormatError, DeviceError) as error:
        log.warning("disk %d: its own metadata is unreadable (%s): every extent is rebuilt",
                    disk_id, error)
        then = None
    fresh = fresh_extents(pool.metadata, then, disk_id)
    geometry = disk.geometry
    pool.checksums.forget_disk(disk_id)  # cached pages may hold writes that never landed
    for _, extent in sorted(fresh):  # leftovers of another slab must never pass as data
        pool.checksums.forget_extent(disk_id, extent, geometry.checksum_area_size // CSUM_BLOCK)
        await device.zero(pool.extent_offset(disk_id, extent), geometry.extent_stride)
    await device.flush()
    extents = set(pool.extents_of(disk_id))
    pool.resyncing |= extents
    disk.device = device
    disk.returned = None
    try:
        await pool.set_state(disk_id, "resyncing", "back in service: resyncing what it missed")
    except BaseException:
        pool.resyncing -= extents
        raise
    log.info("disk %d back: %d extents to catch up (%d rebuilt whole), missed writes since %d",
             disk_id, len(extents), len(fresh), record.missed_since)
    return len(extents)


async def catch_up_disk(
    pool: "Pool", volumes: dict[str, "Volume"], disk_id: int, progress: "RebuildProgress"
) -> None:
    await catch_up_disks(pool, volumes, [disk_id], progress)


async def catch_up_disks(
    pool: "Pool", volumes: dict[str, "Volume"], disk_ids: list[int],
    progress: "RebuildProgress",
) -> None:
    """Catch up every extent of these "resyncing" disks, in this order, then turn them
    online together: until then none of them is a source for another's parity rows."""
    owners = {
        (d, e): (volume, slab)
        for volume in volumes.values() for slab, extents in volume.record.slabs.items()
        for d, e in extents if d in disk_ids
    }
    pending = [x for d in disk_ids for x in sorted(pool.resyncing) if x[0] == d]
    progress.total += len(pending)
    for extent in pending:
        owner = owners.get(extent)
        if owner is None:
            pool.resyncing.discard(extent)  # moved away meanwhile
        else:
            progress.bytes_moved += await catch_up_extent(owner[0], owner[1], extent)
        progress.done += 1
        await trio.lowlevel.checkpoint()
    for disk_id in disk_ids:
        disk = pool.disks.get(disk_id)
        if disk is None or disk.record.state != "resyncing":
            continue  # failed again meanwhile: it stays out
        disk.record.missed_since = 0
        await pool.set_state(disk_id, "online", "resynced")


async def catch_up_extent(volume: "Volume", slab: int, extent: Extent) -> int:
    """Bring one extent up to date under its slab's row locks, by the rule of the volume's
    redundancy (`Redundancy.catch_up`); returns bytes rewritten. Once it is, the extent
    leaves `Pool.resyncing`; if that fails, it stays there."""
    pool = volume.pool
    async with volume.row_locks.hold(column_rows(volume.spec, slab, 0, pool.slab_size)):
        extents = volume.record.slabs.get(slab)
        if extents is None or extent not in extents:
            pool.resyncing.discard(extent)
            return 0
        since = pool.disks[extent[0]].record.missed_since or 1
        return await volume.redundancy.catch_up(slab, extents, extents.index(extent), since)
