"""The two copies of each member's label: a damaged one is rewritten from the good one.

Every disk carries its label at offset 0 and in its last 4 KiB block (`DiskGeometry.
backup_label_offset`); either valid copy is enough to open the pool, so a damaged copy goes
unnoticed until the other one is damaged too. At open for writing (mount, an offline command
that changes the pool) and at every scrub, each disk in service is checked: if exactly one
copy is a valid label of this disk, its bytes are written over the other (a checksum
mismatch, zeros, garbage, or the label of another disk), flushed, and reported. Two valid
copies that differ are left alone (nothing says which is right), as is a disk with no valid
copy (it could not have been opened).

`plan_repair` is the pure decision; `repair_label_copies` does the I/O through
`Pool.disk_io`, so a disk that hangs here is bounded like any other request.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from blockspace.disks.devices import Device
from blockspace.errors import DeviceError, FormatError
from blockspace.ondisk.label import LABEL_SIZE, decode_label
from blockspace.pool.pool import Pool, PoolDisk

log = logging.getLogger(__name__)

COPIES = ("primary", "backup")


@dataclass(frozen=True)
class LabelRepair:
    """Write `raw` (the good copy, byte for byte) over the `damaged` copy, for `reason`."""

    damaged: str  # "primary" or "backup"
    raw: bytes
    reason: str


def plan_repair(
    primary: bytes, backup: bytes, pool_uuid: str, disk_uuid: str
) -> LabelRepair | None:
    """What to rewrite, if exactly one copy is a valid label of disk `disk_uuid` of pool
    `pool_uuid`; None if both are (or neither is: nothing to copy from)."""
    good: dict[str, bytes] = {}
    problems: dict[str, str] = {}
    for which, raw in zip(COPIES, (primary, backup), strict=True):
        try:
            label = decode_label(raw)
        except FormatError as error:
            problems[which] = str(error)
            continue
        if label is None:
            problems[which] = ("all zeros" if not any(raw) else "no Blockspace label")
        elif label.pool_uuid != pool_uuid or label.disk_uuid != disk_uuid:
            problems[which] = f"the label of another disk ({label.disk_uuid})"
        else:
            good[which] = raw
    if len(good) != 1:
        return None
    (source, raw), = good.items()
    damaged = COPIES[1 - COPIES.index(source)]
    return LabelRepair(damaged, raw, f"{problems[damaged]}: rewritten from the {source}")


async def repair_label_copies(pool: Pool) -> list[str]:
    """Check both label copies of every disk in service and rewrite a damaged one from the
    good one; one line per disk repaired (also logged as a warning). A disk that cannot be
    read or written here is skipped (the I/O paths deal with a failing disk)."""
    repaired = []
    for disk_id, disk in sorted(pool.disks.items()):
        if not disk.usable:
            continue
        try:
            line = await _repair_one(pool, disk)
        except DeviceError as error:
            log.warning("disk %d: label copies not checked: %s", disk_id, error)
            continue
        if line is not None:
            log.warning("%s", line)
            repaired.append(line)
    return repaired


async def _repair_one(pool: Pool, disk: PoolDisk) -> str | None:
    backup_offset = disk.geometry.backup_label_offset
    if disk.device is None or backup_offset + LABEL_SIZE > disk.device.size:
        return None  # shorter than its label says: not this module's to judge

    async def read_copies(device: Device) -> tuple[bytes, bytes]:
        return (await device.read(0, LABEL_SIZE),
                await device.read(backup_offset, LABEL_SIZE))

    primary, backup = await pool.disk_io(disk, "label read", read_copies, attempts=2)
    plan = plan_repair(primary, backup, pool.uuid, disk.record.disk_uuid)
    if plan is None:
        return None
    offset = 0 if plan.damaged == "primary" else backup_offset

    async def rewrite(device: Device) -> None:
        await device.write(offset, plan.raw)
        await device.flush()

    await pool.disk_io(disk, "label repair", rewrite)
    return f"disk {disk.record.disk_id} ({disk.path}): {plan.damaged} label {plan.reason}"
