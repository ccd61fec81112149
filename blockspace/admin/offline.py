"""The work the CLI does in its own process while a pool is not mounted: create a pool, find a
pool on disks, report status, change volumes, run a disk job or a scrub to completion, tier
status and pins. The daemon does the same through its control socket while it is mounted.

Each function opens what it needs and closes it again; progress goes to a callback (the CLI's
progress bar), so nothing here prints."""

import os
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import trio

from blockspace.admin.pools import NewDisk, disk_identity, opened_disks, opened_pool, pool_status
from blockspace.admin.registry import Registry
from blockspace.disks.devices import FileDevice, probe
from blockspace.errors import FormatError, InvalidInput
from blockspace.geometry.layouts import default_layout
from blockspace.pool.label_copies import repair_label_copies
from blockspace.pool.lease import LeaseOptions, lease_summary
from blockspace.pool.pool import Pool, read_label

Progress = Callable[[dict[str, Any]], None]


async def create_pool(
    name: str, disks: Sequence[NewDisk], *, slab_size: int, meta_slot_size: int | None
) -> dict[str, Any]:
    """Label checked new disks (admin.pools.check_new_disks) as a pool; its status."""
    devices = [FileDevice(disk.path) for disk in disks]
    try:
        pool = await Pool.create(
            name, devices, media=[d.media for d in disks], slab_size=slab_size,
            meta_slot_size=meta_slot_size,
        )
        return pool_status(pool)
    finally:
        for device in devices:
            device.close()


@dataclass(frozen=True)
class FoundPool:
    uuid: str
    label_name: str  # the name in the labels (`pool import --name` may register another)
    paths: list[str]  # absolute


def find_pool(paths: Sequence[str]) -> FoundPool:
    """The one pool whose member disks `paths` are, from their labels; InvalidInput when a
    disk is missing, given twice or blank or the disks belong to several pools, FormatError
    for a damaged label."""
    found: dict[str, tuple[str, list[str]]] = {}
    seen: dict[tuple[int, int], str] = {}
    for path in paths:
        probe(path)
        identity = disk_identity(path)
        if identity in seen:
            raise InvalidInput(f"{path} is given twice (same disk as {seen[identity]})")
        seen[identity] = path
        device = FileDevice(path, writable=False, workers=1)
        try:
            label = read_label(device)
        except FormatError as error:
            raise FormatError(
                f"{path}: {error}; leave this disk out to import the pool without it"
            ) from None
        finally:
            device.close()
        if label is None:
            raise InvalidInput(f"{path} is not a Blockspace disk")
        _, members = found.setdefault(label.pool_uuid, (label.pool_name, []))
        members.append(os.path.abspath(path))
    if len(found) > 1:
        names = ", ".join(f"{n} ({u})" for u, (n, _) in found.items())
        raise InvalidInput(f"the disks belong to several pools: {names}; import one at a time")
    pool_uuid, (label_name, members) = next(iter(found.items()))
    return FoundPool(pool_uuid, label_name, members)


def scan_directory(directory: str) -> tuple[list[FoundPool], list[str]]:
    """The pools whose members are in `directory` (its regular files and block devices, not
    its subdirectories), and the entries skipped: not a Blockspace disk, a damaged label, a
    second path to a disk already found, unreadable. InvalidInput if it is no directory."""
    if not os.path.isdir(directory):
        raise InvalidInput(f"{directory}: not a directory")
    found: dict[str, FoundPool] = {}
    skipped: list[str] = []
    seen: set[tuple[int, int]] = set()
    for entry in sorted(os.scandir(directory), key=lambda e: e.name):
        path = entry.path
        try:
            mode = os.stat(path).st_mode
            if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
                continue
            identity = disk_identity(path)
            if identity in seen:
                skipped.append(f"{path}: a second path to a disk already found")
                continue
            device = FileDevice(path, writable=False, workers=1)
            try:
                label = read_label(device)
            finally:
                device.close()
        except (OSError, FormatError, InvalidInput) as error:
            skipped.append(f"{path}: {error}")
            continue
        if label is None:
            skipped.append(f"{path}: not a Blockspace disk")
            continue
        seen.add(identity)
        pool = found.setdefault(label.pool_uuid,
                                FoundPool(label.pool_uuid, label.pool_name, []))
        pool.paths.append(os.path.abspath(path))
    return list(found.values()), skipped


def pick_found_pool(pools: list[FoundPool], wanted: str | None, directory: str) -> FoundPool:
    """The pool `pool import -d DIR [POOL]` means: the one named (label name or uuid), or
    the only one found; InvalidInput naming the choices otherwise."""
    choices = ", ".join(f"{p.label_name} ({p.uuid})" for p in pools) or "none"
    if wanted is not None:
        matches = [p for p in pools if wanted in (p.label_name, p.uuid)]
        if len(matches) == 1:
            return matches[0]
        if not matches:
            raise InvalidInput(f"no pool {wanted!r} among the disks in {directory} "
                               f"(found: {choices})")
        raise InvalidInput(f"several pools named {wanted!r} in {directory}: {choices}; "
                           "name one by its uuid")
    if len(pools) == 1:
        return pools[0]
    if not pools:
        raise InvalidInput(f"no Blockspace disks in {directory}")
    raise InvalidInput(f"the disks in {directory} belong to several pools: {choices}; "
                       "name the one to import")


async def check_found_pool(found: FoundPool, name: str) -> dict[str, Any]:
    """Open a found pool once (one that does not open must not be registered); its status."""
    async with opened_disks(found.paths, found.uuid, name) as pool:
        return pool_status(pool)


async def status(registry: Registry, name: str) -> dict[str, Any]:
    """`pool status` of an unmounted pool: the last scrub from the state directory, tiers."""
    from blockspace.tiering.admin import overview

    async with opened_pool(registry, name) as pool:  # read-only: takes no lease, shows it
        scrub = registry.scrub_state(name)
        if scrub is not None:
            scrub.pop("cursor", None)
        return pool_status(pool, scrub=scrub, lease=await lease_summary(pool)) | {
            "tiers": overview(pool)}


async def volume_show(registry: Registry, name: str, volume: str, with_map: bool
                      ) -> dict[str, Any]:
    """`volume show` of an unmounted pool."""
    from blockspace.admin.placement import placement

    async with opened_pool(registry, name) as pool:
        return placement(pool, volume, pool_name=name, with_map=with_map, mounted=False)


async def change_volume(
    registry: Registry, name: str, op: str, fields: dict[str, Any],
    lease: LeaseOptions | None = None,
) -> None:
    """volume_create / volume_delete / volume_grow with the fields of the daemon's request."""
    from blockspace.tiering import admin as tier_admin

    async with opened_pool(registry, name, writer=lease or LeaseOptions()) as pool:
        if op == "volume_create" and fields.get("tiers"):
            await tier_admin.create_tiered(
                pool, fields["name"], [tier_admin.parse_tier(t) for t in fields["tiers"]],
                provisioning=fields["provisioning"], unit=fields.get("tier_unit"),
                interleave=fields.get("interleave"))
        elif op == "volume_create":
            spec = default_layout(
                fields["resiliency"], len(pool.usable_disk_ids()),
                copies=fields["copies"], parity=fields["parity"],
                columns=fields["columns"], interleave=fields["interleave"],
            )
            await pool.create_volume(fields["name"], fields["size"], spec,
                                     fields["provisioning"])
        elif op == "volume_delete":
            await tier_admin.delete_volume(pool, fields["name"])  # a tiered one with its tiers
        elif op == "volume_grow":
            tier_admin.check_growable(pool, fields["name"])
            await pool.grow_volume(fields["name"], fields["size"])
        else:
            raise InvalidInput(f"unknown volume change {op!r}")


async def disk_job(
    registry: Registry, name: str, op: str, fields: dict[str, Any], progress: Progress,
    lease: LeaseOptions | None = None,
) -> dict[str, Any]:
    """A disk request (the daemon's disk_* / pool_repair / pool_rebalance) run to the end:
    `{"added": ids}` for disk_add, else the rebuild's final progress."""
    from blockspace.admin.manage import DiskManager
    from blockspace.volume.volume import Volume

    async with opened_pool(registry, name, writer=lease or LeaseOptions()) as pool, \
            trio.open_nursery() as nursery:
        volumes = {v.name: Volume(pool, v) for v in pool.metadata.volumes}
        manager = DiskManager(pool, lambda: volumes, registry, name, nursery)
        manager.rate_limit = int(fields.get("rate") or 0)
        if op == "disk_add":
            return {"added": await manager.add(fields["paths"], fields["media"],
                                               fields["force"])}
        if op in ("disk_retire", "disk_remove"):
            await manager.retire(fields["disk"], remove=op == "disk_remove")
        elif op == "disk_replace":
            await manager.replace(fields["old"], fields["new"], fields["media"],
                                  fields["force"])
        elif op == "disk_online":
            await manager.online(fields["disks"], fields["device"])
        elif op == "pool_rebalance":
            await manager.rebalance()
        elif op == "pool_repair":
            await manager.repair()
        else:
            raise InvalidInput(f"unknown disk request {op!r}")
        while not manager.rebuilder.finished.is_set():
            progress(manager.rebuilder.progress.to_dict())
            with trio.move_on_after(0.5):
                await manager.rebuilder.finished.wait()
        await pool.flush()
        return manager.rebuilder.progress.to_dict()


async def clear_disk_errors(registry: Registry, name: str, disk: str) -> dict[str, Any]:
    """`disk clear` of an unmounted pool: the disk's error counters back to zero."""
    async with opened_pool(registry, name) as pool:
        disk_id = pool.find_disk(disk)
        await pool.clear_errors(disk_id)
        return {"cleared": disk_id}


def interrupted_job(registry: Registry, name: str, *, cancel: bool = False,
                    rate: int | None = None) -> dict[str, Any] | None:
    """`disk rebuild` of an unmounted pool: the extent job a stop interrupted, which the
    next mount resumes (None: there is none); `cancel` forgets it (it will not resume),
    `rate` changes the rate it resumes at."""
    registry.get(name)
    job = registry.job_state(name)
    if job is None:
        return None
    state = "interrupted"
    if cancel:
        registry.clear_job_state(name)
        state = "cancelled"
    elif rate is not None:
        job["rate"] = rate
        registry.save_job_state(name, job)
    return {"state": state, "reason": str(job.get("reason", job.get("op"))),
            "rate_limit": int(job.get("rate") or 0), "job": job}


async def scrub(
    registry: Registry, name: str, volume: str | None, rate: int, progress: Progress,
    lease: LeaseOptions | None = None,
) -> dict[str, Any]:
    """Scrub an unmounted pool (or one volume of it) to the end; the final progress."""
    from blockspace.repair.scrub import Scrubber
    from blockspace.volume.volume import Volume

    async with opened_pool(registry, name, writer=lease or LeaseOptions()) as pool:
        volumes = {v.name: Volume(pool, v) for v in pool.metadata.volumes}
        if volume is not None and volume not in volumes:
            raise InvalidInput(f"no volume {volume!r} in pool {name!r}")
        scrubber = Scrubber(lambda: volumes,
                            lambda p: registry.save_scrub_state(name, p.to_state()),
                            check_labels=lambda: repair_label_copies(pool))
        scrubber.plan(volume, rate)

        async def on_slab() -> None:
            progress(scrubber.progress.to_dict())

        await scrubber.run(on_slab)
        await pool.flush()
        return scrubber.progress.to_dict()


# ---- tiers --------------------------------------------------------------------------------


def _tier_statuses(pool: Pool, registry: Registry, name: str, volume: str | None) -> list[Any]:
    from blockspace.tiering import admin as tier_admin
    from blockspace.tiering.heat import HeatMap

    records = [r for r in pool.metadata.volumes if r.tiers is not None]
    if volume is not None:
        record = pool.volume(volume)
        if record.tiers is None:
            raise InvalidInput(f"volume {volume!r} is not tiered")
        records = [record]
    result = []
    for record in records:
        assert record.tiers is not None
        heat = HeatMap(record.size // record.tiers.unit)
        tier_admin.load_heat(tier_admin.heat_path(registry.root, name, record.name), heat)
        result.append(tier_admin.volume_status(pool, record, heat, {"mounted": False}))
    return result


async def tier_status(registry: Registry, name: str, volume: str | None) -> list[Any]:
    """`tier status` of an unmounted pool, from the metadata and the heat last saved."""
    async with opened_pool(registry, name) as pool:  # read-only: takes no lease
        return _tier_statuses(pool, registry, name, volume)


async def tier_pins(
    registry: Registry, name: str, volume: str, offset: int, length: int | None,
    tier: str | None, lease: LeaseOptions | None = None,
) -> Any:
    """Pin a range to `tier`, or unpin it (tier None); the volume's tier status after."""
    from blockspace.tiering import admin as tier_admin

    async with opened_pool(registry, name, writer=lease or LeaseOptions()) as pool:
        if tier is not None:
            await tier_admin.pin(pool, volume, offset, length, tier)
        else:
            await tier_admin.unpin(pool, volume, offset, length)
        return _tier_statuses(pool, registry, name, volume)[0]
