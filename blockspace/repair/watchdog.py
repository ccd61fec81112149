"""Noticing a disk that died or vanished while nobody wrote to it.

Writes find a dead disk by themselves; an idle one would stay "online" in `pool status`
while its copies are gone. Every few seconds the watchdog reads each disk's label (4 KiB,
bounded by the I/O timeout, all disks at once): a disk that fails the probe three times in
a row is failed, which starts the repair. A deleted image file stays readable and writable
through the daemon's open descriptor (the inode lives until it is closed), so no I/O error
would ever say it is gone and everything written to it would be lost at unmount: the
watchdog looks at each image's link count and takes a deleted one out as `missing`.
"""

import logging
import os
import stat
from typing import TYPE_CHECKING

import trio

from blockspace.disks.devices import Device
from blockspace.errors import DeviceError

if TYPE_CHECKING:
    from blockspace.pool.pool import Pool

log = logging.getLogger(__name__)

INTERVAL = 2.0  # seconds between looks
PROBE_FAILURES = 3  # failed label reads in a row that fail a disk


def image_deleted(device: Device) -> bool:
    """True when the device is a regular file that no longer has a name."""
    try:
        fd = device.fileno()  # type: ignore[attr-defined]
    except (AttributeError, OSError, ValueError):
        return False  # not a file-backed device (memory disks in tests)
    try:
        info = os.fstat(fd)
    except OSError:
        return False  # closed meanwhile: its I/O will say so
    return stat.S_ISREG(info.st_mode) and info.st_nlink == 0


async def watch_disks(pool: "Pool", interval: float = INTERVAL) -> None:
    failures: dict[int, int] = {}
    while True:
        await check_disks(pool)
        await probe_disks(pool, failures)
        await trio.sleep(interval)


async def check_disks(pool: "Pool") -> list[int]:
    """Take out of service every disk whose image file was deleted; returns their ids."""
    gone = [d for d, disk in pool.disks.items()
            if disk.usable and disk.device is not None and image_deleted(disk.device)]
    for disk_id in gone:
        await pool.set_state(disk_id, "missing", "its image file was deleted")
    return gone


async def probe_disks(pool: "Pool", failures: dict[int, int]) -> list[int]:
    """Read every usable disk's label; fail those that failed PROBE_FAILURES times in a
    row (`failures` carries the counts between calls). Returns the disks failed now."""
    failed: list[int] = []

    async def probe(disk_id: int) -> None:
        disk = pool.disks[disk_id]

        async def read(device: Device) -> None:
            await device.read(0, 4096)

        try:
            await pool.disk_io(disk, "label read", read)
        except DeviceError as error:
            failures[disk_id] = failures.get(disk_id, 0) + 1
            log.warning("disk %d: probe failed (%d in a row): %s", disk_id,
                        failures[disk_id], error)
            if failures[disk_id] >= PROBE_FAILURES and disk.usable:
                pool.count_device_error(disk_id, "read")
                await pool.mark_failed(disk_id, f"does not answer reads: {error}")
                failed.append(disk_id)
        else:
            failures.pop(disk_id, None)

    for disk_id in [d for d in failures if not pool.disks.get(d) or not pool.disks[d].usable]:
        del failures[disk_id]  # out of service already: no longer watched
    async with trio.open_nursery() as nursery:
        for disk_id, disk in pool.disks.items():
            if disk.usable:
                nursery.start_soon(probe, disk_id)
    return failed
