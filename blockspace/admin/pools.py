"""Pool administration shared by the offline CLI and the daemon: opening a registered pool,
validating new disks, and the status report (a plain dict, the same for tables and --json).
"""

import logging
import os
import stat
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from operator import itemgetter
from typing import Any

import trio

from blockspace.admin.registry import Registry
from blockspace.disks.devices import Device, FileDevice, probe
from blockspace.disks.gate import GatedDevice, WriteGate
from blockspace.disks.hostlock import HostLock
from blockspace.errors import BlockspaceError, DeviceError, FormatError, InvalidInput
from blockspace.geometry.allocator import max_slabs
from blockspace.geometry.layouts import KINDS, LayoutSpec, default_layout
from blockspace.ondisk.label import MEDIA, compute_geometry
from blockspace.pool.label_copies import repair_label_copies
from blockspace.pool.lease import LeaseOptions, WriterLease
from blockspace.pool.pool import Pool, read_label
from blockspace.volume.concurrency import leaves

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NewDisk:
    path: str
    size: int
    media: str


def check_new_disks(
    paths: Sequence[str], *, media: str | None, slab_size: int, meta_slot_size: int, force: bool
) -> list[NewDisk]:
    """Everything `pool create` must know before it writes a byte; raises InvalidInput."""
    if not paths:
        raise InvalidInput("a pool needs at least one disk")
    if media is not None and media not in MEDIA:
        raise InvalidInput(f"--media must be one of {', '.join(MEDIA)}, not {media!r}")
    seen: dict[tuple[int, int], str] = {}
    disks = []
    for path in paths:
        info = probe(path)
        identity = disk_identity(path)
        if identity in seen:
            raise InvalidInput(f"{path} is given twice (same disk as {seen[identity]})")
        seen[identity] = path
        compute_geometry(info.size, slab_size, meta_slot_size)  # raises if too small
        if media is not None:
            medium = media
        elif info.rotational is not None:
            medium = "hdd" if info.rotational else "ssd"
        else:
            medium = "hdd"
        disks.append(NewDisk(path, info.size, medium))
    for disk in disks:
        _check_not_member(disk.path, force)
    return disks


def disk_identity(path: str) -> tuple[int, int]:
    """What makes two paths the same disk: the device number of a block device, else the
    inode (so a symlink or hard link to an image is recognised)."""
    st = os.stat(path)
    return (st.st_rdev, 0) if stat.S_ISBLK(st.st_mode) else (st.st_dev, st.st_ino)


def _check_not_member(path: str, force: bool) -> None:
    device = FileDevice(path, writable=False, workers=1)
    try:
        try:
            label = read_label(device)
        except FormatError:
            if force:
                return
            raise InvalidInput(
                f"{path} carries a damaged Blockspace label (use --force to overwrite it)"
            ) from None
        if label is not None and not force:
            raise InvalidInput(
                f"{path} already belongs to pool {label.pool_name!r} ({label.pool_uuid}); "
                "use --force to overwrite it"
            )
        if label is not None:  # --force overwrites a member, never one a writer holds
            HostLock.acquire(label.disk_uuid, what=f"{path} (pool {label.pool_name!r} disk "
                             f"{label.disk_id})", device_path=path).release()
    finally:
        device.close()


def open_devices(paths: Sequence[str], gate: WriteGate | None = None) -> list[Device]:
    """Open whichever of `paths` exist; absent ones are the pool's missing disks. With a
    `gate`, behind it (the first write waits for the writer lease to be written)."""
    devices: list[Device] = []
    for path in paths:
        try:
            device = FileDevice(path)
            devices.append(device if gate is None else GatedDevice(device, gate))
        except InvalidInput as error:
            log.warning("disk not available: %s", error)
        except DeviceError as error:
            log.warning("disk not available: %s", error)
    return devices


@asynccontextmanager
async def opened_pool(
    registry: Registry, name: str, *, writer: LeaseOptions | None = None
) -> AsyncIterator[Pool]:
    """Open a registered, unmounted pool for offline work: for writing (the writer lease
    taken, see `opened_disks`) unless `writer` is None; after a command that wrote, damaged
    label copies are rewritten from the good ones, as at mount."""
    entry = registry.get(name)
    mount = registry.mount_info(name)
    if mount is not None:
        raise BlockspaceError(f"pool {name!r} is mounted at {mount.mountpoint} (pid {mount.pid})")
    async with opened_disks(entry.disks, entry.uuid, name, writer=writer) as pool:
        yield pool
        if writer is not None:  # a command that changed the pool: as at mount
            await repair_label_copies(pool)


@asynccontextmanager
async def opened_disks(
    paths: Sequence[str], pool_uuid: str, name: str, *, writer: LeaseOptions | None = None
) -> AsyncIterator[Pool]:
    """Open the pool `pool_uuid` from whichever of `paths` are present. With `writer` the
    pool is this process's to write: its host locks and lease are taken before the caller
    runs (DiskInUse naming the holder otherwise), beaten while it runs and released after;
    without, nothing may be written (read-only work: status)."""
    gate = WriteGate() if writer is not None else None
    devices = open_devices(paths, gate)
    try:
        if not devices:
            raise BlockspaceError(f"none of the disks of pool {name!r} can be opened")
        pool = await Pool.open(devices, expect_uuid=pool_uuid)
    except BaseException:
        for device in devices:
            device.close()
        raise
    try:
        if writer is None:
            yield pool
            return
        assert gate is not None
        lease = WriterLease(pool, writer)
        await lease.acquire(defer=True)  # written before the command's first write
        gate.hook = lease.write_first
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(lease.beat)  # a long job (a rebuild) keeps it alive
                try:
                    yield pool
                finally:
                    nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:  # the caller's own error, not wrapped by us
            found = leaves(group)
            if len(found) == 1:
                raise found[0] from None
            raise
        finally:
            with trio.CancelScope(shield=True):
                await lease.release()
    finally:
        pool.close()
        for device in devices:
            device.close()


# ---- status -------------------------------------------------------------------------


def volume_state(pool: Pool, spec: LayoutSpec, slabs: dict[int, list[tuple[int, int]]],
                 *, unmapped: bool = False) -> str:
    """A volume is as bad as its worst slab; a thin volume with `unmapped` space also as bad
    as a new slab would be (placed short of columns, or not at all: its writes fail)."""
    worst = 0
    if unmapped:
        worst = max(0, spec.width - len(pool.usable_disk_ids()))
    # Only extents on a disk out of service, or awaiting resync, can be absent: with every
    # disk in service and nothing resyncing there is nothing to look at (status at 500k slabs).
    if worst or not all(disk.usable for disk in pool.disks.values()) or pool.resyncing:
        for extents in slabs.values():
            lost = sum(pool.extent_device(*extent) is None for extent in extents)
            worst = max(worst, lost)
    if worst == 0:
        return "online"
    return "degraded" if worst <= spec.tolerance else "failed"


VOLUME_STATES = ("online", "degraded", "failed")  # best to worst


def states_of_volumes(pool: Pool) -> dict[str, str]:
    """Each volume's state. A tiered volume holds no slabs of its own: it is as good as the
    worse of its two tiers (a failed hdd tier fails it, however healthy the ssd tier)."""
    states = {}
    for record in pool.metadata.volumes:
        spec = LayoutSpec.from_dict(record.layout)
        unmapped = record.tiers is None and len(record.slabs) < pool.slab_count(record)
        states[record.name] = volume_state(pool, spec, record.slabs, unmapped=unmapped)
    for record in pool.metadata.volumes:
        if record.tiers is not None:
            tiers = [states.get(record.tiers.ssd, "failed"), states.get(record.tiers.hdd,
                                                                        "failed")]
            states[record.name] = max(tiers, key=VOLUME_STATES.index)
    return states


def usable_capacity(pool: Pool, media: str | None = None) -> dict[str, int | None]:
    """Volume bytes that still fit, per resiliency, from the current free space (of the
    disks of one media class, if given)."""
    usable_ids = [d for d in pool.usable_disk_ids()
                  if media is None or pool.disks[d].record.media == media]
    free = {d: n for d, n in pool.allocator.free_map().items() if d in usable_ids}
    result: dict[str, int | None] = {}
    variants: dict[str, list[dict[str, int]]] = {
        "simple": [{}], "mirror": [{"copies": 2}, {"copies": 3}],
        "parity": [{"parity": 1}, {"parity": 2}],
    }
    for kind in KINDS:
        for options in variants[kind]:
            spec = default_layout(kind, len(usable_ids), **options)
            key = kind if kind == "simple" else f"{kind}-{next(iter(options.values()))}"
            if spec.width > len(usable_ids):
                result[key] = None
                continue
            result[key] = max_slabs(free, spec.width) * spec.slab_data_size(pool.slab_size)
    return result


def pool_status(
    pool: Pool, mountpoint: str | None = None, scrub: dict[str, Any] | None = None, *,
    lease: dict[str, Any] | None = None,
) -> dict[str, Any]:
    free_map = pool.allocator.free_map()
    pool.check_host_room()
    on_disk = Counter(map(itemgetter(0), pool.metadata.used_extents()))  # C speed: 500k slabs
    disks: list[dict[str, Any]] = []
    for disk_id, disk in sorted(pool.disks.items()):
        disk_record = disk.record
        stride = disk.geometry.extent_stride
        free_extents = free_map.get(disk_id, 0)
        present = disk.device is not None or disk_record.state != "online"
        state = disk_record.state if present else "missing"
        disks.append(
            {
                "id": disk_id,
                "path": disk.path,
                "uuid": disk_record.disk_uuid,
                "media": disk_record.media,
                "size": disk_record.size,
                "extents": disk_record.extent_count,
                "free_extents": free_extents,
                "used_bytes": (disk_record.extent_count - free_extents) * pool.slab_size,
                "free_bytes": free_extents * pool.slab_size,
                "extent_stride": stride,
                "state": state,
                "state_reason": disk_record.state_reason,
                "state_since": disk_record.state_since,
                "data_extents": on_disk[disk_id],
                "errors": dict(disk.errors),
                "host_full": pool.host_full.get(disk_id),
            }
        )
    volumes = []
    by_volume = states_of_volumes(pool)
    for record in pool.metadata.volumes:
        spec = LayoutSpec.from_dict(record.layout)
        volumes.append(
            {
                "name": record.name,
                "uuid": record.uuid,
                "size": record.size,
                "resiliency": spec.describe(),
                "layout": spec.to_dict(),
                "provisioning": record.provisioning,
                "slabs": len(record.slabs),
                "allocated": len(record.slabs) * spec.slab_data_size(pool.slab_size),
                "footprint": len(record.slabs) * spec.width * pool.slab_size,
                "state": by_volume[record.name],
            }
        )
    states = {d["state"] for d in disks}
    volume_states = {v["state"] for v in volumes}
    if "failed" in volume_states:
        health = "failed"
    elif states != {"online"} or "degraded" in volume_states:
        health = "degraded"
    else:
        health = "online"
    metadata = metadata_status(pool)
    if metadata["error"] and health == "online":
        health = "degraded"  # changes may not be recordable: not a healthy pool
    return {
        "name": pool.name,
        "uuid": pool.uuid,
        "health": health,
        "generation": pool.metadata.generation,
        "slab_size": pool.slab_size,
        "mountpoint": mountpoint,
        "raw_size": sum(d["extents"] for d in disks) * pool.slab_size,
        "raw_free": sum(d["free_bytes"] for d in disks if d["state"] == "online"),
        "usable": usable_capacity(pool),
        # per media class only when the pool has both: a volume lives on one class
        "usable_by_media": {m: usable_capacity(pool, m) for m in MEDIA}
        if {d["media"] for d in disks} >= set(MEDIA) else None,
        "disks": disks,
        "volumes": volumes,
        "scrub": scrub,
        "lease": lease,  # who writes the pool (blockspace/pool/lease.py summary), if known
        "actions": [host_full_action(d["path"]) for d in disks if d["host_full"]],
        "metadata": metadata,
    }


def host_full_action(path: str) -> str:
    """What `pool status` asks of the user while a disk's host file system is full."""
    directory = os.path.dirname(os.path.abspath(path))
    return (f"host file system under {path} is full: free space there ({directory}); "
            "writes that need new space fail with ENOSPC until then")


def metadata_status(pool: Pool) -> dict[str, Any]:
    """The metadata area: its format, size, what the pool's capacity may need, and the
    error of the last commit if it failed (a change, or a disk failure, not recorded)."""
    needed = pool.required_slot_size()
    size = pool.metadata.meta_slot_size
    warning = ""
    if size < needed:
        warning = (f"the metadata area ({size} bytes) is smaller than the {needed} bytes the "
                   "pool's full map may need: allocation can fail with ENOSPC before the "
                   "disks are full")
    return {"format": pool.journal.version, "slot_size": size, "needed": needed,
            "generation": pool.metadata.generation, "error": pool.metadata_error,
            "warning": warning}
