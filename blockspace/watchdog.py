"""Noticing a disk that vanished while nobody wrote to it.

A deleted image file stays writable through the daemon's open descriptor (the inode lives
on until it is closed), so no I/O error would ever say it is gone: everything written to it
would be lost at unmount. The watchdog looks at each image's link count every few seconds
and takes a deleted one out of service as `missing`, which starts the repair like a failure.
A block device that goes away fails its I/O instead (and is failed by the volume).
"""

import logging
import os
import stat
from typing import TYPE_CHECKING

import trio

from blockspace.devices import Device

if TYPE_CHECKING:
    from blockspace.pool import Pool

log = logging.getLogger(__name__)

INTERVAL = 2.0  # seconds between looks


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
    while True:
        await check_disks(pool)
        await trio.sleep(interval)


async def check_disks(pool: "Pool") -> list[int]:
    """Take out of service every disk whose image file was deleted; returns their ids."""
    gone = [d for d, disk in pool.disks.items()
            if disk.usable and disk.device is not None and image_deleted(disk.device)]
    for disk_id in gone:
        await pool.set_state(disk_id, "missing", "its image file was deleted")
    return gone
