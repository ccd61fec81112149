"""Re-admitting a disk that comes back after it failed or went missing.

Its extents are resynced by what changed while it was away, not copied whole. What
changed is told by the write sequence numbers every checksum entry carries: the disk
record keeps `missed_since`, the write number from which it may have missed writes.

* A mirror extent is compared with the other copies entry by entry (16 bytes per 4 KiB,
  so the comparison reads 0.4% of the data); only ranges whose entries differ are read
  and merged, the newest valid copy winning, as a scrub would.
* A parity extent gets every row rebuilt in which another column carries write
  `missed_since` or a later one; rows nobody wrote since are trusted as they are.
* An extent the disk did not hold when it left (a slab placed degraded while it was away,
  see Pool.allocate_slabs) holds leftovers: it is zeroed first, then rebuilt like the rest.
  What it held is read from the disk's own last metadata generation.

Until an extent is resynced it is in `Pool.resyncing`, so every read, write, scrub and
move treats it as absent. Each extent is done under its slab's row locks, so no write
races it. The disk is "resyncing" in the metadata for the whole time: a restart starts
again from the first extent (comparisons are cheap), and it turns "online" at the end.
"""

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING

import trio

from blockspace.disks.devices import Device
from blockspace.errors import DeviceError, FormatError, InvalidInput
from blockspace.geometry.allocator import Extent
from blockspace.ondisk.checksums import CSUM_BLOCK, entry_at, entry_seq
from blockspace.ondisk.metadata import PoolMetadata

if TYPE_CHECKING:
    from blockspace.pool.pool import Pool
    from blockspace.repair.rebuild import RebuildProgress
    from blockspace.volume.volume import Volume

log = logging.getLogger(__name__)

CHUNK = 1 << 20  # extent bytes compared per step
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


def rows_written_since(
    entries: dict[int, bytes], skip: int, rows: Iterable[int], blocks_per_row: int, since: int
) -> list[int]:
    """Parity: the rows (numbered within the compared range) in which some column other
    than `skip` holds a block written by write `since` or later (`since` itself was in
    flight when the disk left, and may be what failed it). `entries`: position -> entries."""
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


def returning_order(pool: "Pool", disk_ids: Iterable[int]) -> list[int]:
    """The disks that left last come back first: for the slabs they share, the disk
    that stayed longer holds writes the other one missed."""
    return sorted(disk_ids, key=lambda d: (-pool.disks[d].record.missed_since, d))


def check_return_order(pool: "Pool", disk_ids: Iterable[int]) -> None:
    """InvalidInput if a disk that left later than one coming back, and shares slabs with
    it, stays out: the returning disk's resync would miss the writes only that one has."""
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
    "resyncing". Returns how many extents await their resync. Nothing changes on error."""
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
    log.info("disk %d back: %d extents to resync (%d rebuilt whole), missed writes since %d",
             disk_id, len(extents), len(fresh), record.missed_since)
    return len(extents)


async def resync_disk(
    pool: "Pool", volumes: dict[str, "Volume"], disk_id: int, progress: "RebuildProgress"
) -> None:
    await resync_disks(pool, volumes, [disk_id], progress)


async def resync_disks(
    pool: "Pool", volumes: dict[str, "Volume"], disk_ids: list[int],
    progress: "RebuildProgress",
) -> None:
    """Resync every extent of these "resyncing" disks, in this order, then turn them online
    together: until then none of them is a source for another's parity rows."""
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
            progress.bytes_moved += await resync_extent(owner[0], owner[1], extent)
        progress.done += 1
        await trio.lowlevel.checkpoint()
    for disk_id in disk_ids:
        disk = pool.disks.get(disk_id)
        if disk is None or disk.record.state != "resyncing":
            continue  # failed again meanwhile: it stays out
        disk.record.missed_since = 0
        await pool.set_state(disk_id, "online", "resynced")


async def resync_extent(volume: "Volume", slab: int, extent: Extent) -> int:
    """Bring one extent up to date under its slab's row locks; returns bytes rewritten."""
    pool = volume.pool
    async with volume._row_locks.hold(volume._column_rows(slab, 0, pool.slab_size)):
        extents = volume.record.slabs.get(slab)
        if extents is None or extent not in extents:
            pool.resyncing.discard(extent)
            return 0
        position = extents.index(extent)
        since = pool.disks[extent[0]].record.missed_since or 1
        if volume.spec.kind == "parity":
            rewritten = await _resync_parity(volume, slab, extents, position, since)
            pool.resyncing.discard(extent)
            return rewritten
        pool.resyncing.discard(extent)  # a copy again: the merge compares it with the rest
        try:
            return await _resync_copies(volume, slab, extents, position)
        except BaseException:
            pool.resyncing.add(extent)
            raise


async def _resync_copies(volume: "Volume", slab: int, extents: list[Extent], position: int) -> int:
    from blockspace.geometry.layouts import data_positions

    if volume.spec.kind == "simple":
        return 0  # its only copy: nothing to compare it with
    column = position // volume.spec.copies
    positions = data_positions(volume.spec, 0, column)
    rewritten = 0
    for start in range(0, volume.pool.slab_size, CHUNK):
        end = start + CHUNK
        entries = await volume.entries_by_position(extents, positions, start, end, resync=True)
        if position not in entries:
            raise DeviceError(f"disk {extents[position][0]} could not be read while resyncing")
        if len(set(entries.values())) == 1:
            continue  # every copy carries the same writes
        _, _, choice = await volume.merge_copies(slab, extents, column, start, end)
        rewritten += len(choice.repairs.get(position, ())) * CSUM_BLOCK
    return rewritten


async def _rebuild_from_stayers(
    volume: "Volume", extents: list[Extent], row: int, index: int
) -> bytes | None:
    """Parity: code fragment `index` of a row rebuilt only from columns on disks that never
    left (a returning disk's column may be stale for this row); None if fewer than k."""
    from blockspace.geometry.layouts import code_position, row_start

    spec = volume.spec
    assert volume.codec is not None
    offset = row_start(spec, row)
    found: dict[int, bytes] = {}
    for other in range(spec.width):
        disk_id, _ = extents[code_position(spec, row, other)]
        if other == index or volume.pool.disks[disk_id].record.state == "resyncing":
            continue
        data = await volume._read_verified(extents, code_position(spec, row, other), offset,
                                           offset + spec.interleave)
        if isinstance(data, bytes):
            found[other] = data
            if len(found) == spec.columns:
                return volume.codec.reconstruct(found, [index])[index]
    return None


async def _resync_parity(
    volume: "Volume", slab: int, extents: list[Extent], position: int, since: int
) -> int:
    from blockspace.geometry.layouts import row_start

    spec = volume.spec
    unit = spec.interleave
    blocks_per_row = unit // CSUM_BLOCK
    rewritten = 0
    step = max(CHUNK, unit)
    for start in range(0, volume.pool.slab_size, step):
        end = start + step
        entries = await volume.entries_by_position(extents, range(spec.width), start, end,
                                                  resync=True)
        rows = range((end - start) // unit)
        for local in rows_written_since(entries, position, rows, blocks_per_row, since):
            row = start // unit + local
            index = (position - row) % spec.width
            offset = row_start(spec, row)
            rebuilt = await _rebuild_from_stayers(volume, extents, row, index)
            if rebuilt is None:
                # Fewer than k columns stayed in service: the newer writes the others hold
                # were never acknowledged (the row was beyond its tolerance), and what the
                # returning disk holds is the acknowledged data. Keep it; the write-intent
                # log resyncs the row's parity at the next mount if the write was torn.
                log.warning("slab %d row %d kept as it is on the returning disk", slab, row)
                continue
            if not await volume._write_verified(extents, position, offset, rebuilt,
                                                seq=volume.pool.next_seq(), resync=True):
                raise DeviceError(f"disk {extents[position][0]} failed while resyncing")
            rewritten += unit
    return rewritten
