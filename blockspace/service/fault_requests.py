"""The daemon's side of `blockspace fault ...`: the `fault_inject`, `fault_clear` and
`fault_list` control requests.

They act on the `FaultyDevice`s (blockspace/disks/faults.py) the daemon wrapped the pool's
disks in, which it does only on a mount with `--allow-fault-injection`; without them every
request is refused, so a production mount can never be made to fail on purpose by accident.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

from blockspace.disks.faults import FaultSpec, FaultyDevice
from blockspace.errors import BlockspaceError, InvalidInput
from blockspace.pool.pool import Pool

log = logging.getLogger(__name__)

DISABLED_MESSAGE = "fault injection is disabled on this mount (mount with --allow-fault-injection)"


def handle_fault_request(
    pool: Pool, faulty: Mapping[str, FaultyDevice] | None, op: str, request: dict[str, Any]
) -> Any:
    """Answer one `fault_*` request about the disks of `pool`. `faulty` is the mount's fault
    layer, device path -> the FaultyDevice wrapping that disk, or None on a mount without
    `--allow-fault-injection` (every request is refused). The requests never block, so the
    daemon answers them straight from its async handler; bad input raises InvalidInput and
    changes nothing."""
    if faulty is None:
        raise BlockspaceError(DISABLED_MESSAGE)
    if op == "fault_inject":
        disk_id, path = _find_disk(pool, request.get("disk"))
        device = _faulty_of(faulty, disk_id, path)
        spec = FaultSpec.from_dict(request.get("spec"))
        if spec.empty:
            raise InvalidInput("no fault given (e.g. --read-error 1% or --dead)")
        for offset, length in spec.ranges:
            if offset + length > device.size:
                raise InvalidInput(
                    f"range {offset}:{length} ends past the end of disk {disk_id} "
                    f"({device.size} bytes)"
                )
        device.set_spec(spec)
        log.warning("fault injection: disk %d (%s): %s (seed %d)",
                    disk_id, path, spec.describe(), device.seed)
        return _disk_report(pool, disk_id, device)
    if op == "fault_clear":
        disk = request.get("disk")
        if disk is None:
            targets = sorted((i, d.path) for i, d in pool.disks.items() if d.path in faulty)
        else:
            targets = [_find_disk(pool, disk)]
        cleared = []
        for disk_id, path in targets:
            device = _faulty_of(faulty, disk_id, path)
            if not device.spec.empty:
                log.warning("fault injection: disk %d (%s): faults cleared", disk_id, path)
                cleared.append(disk_id)
            device.clear()
        return {"cleared": cleared, "disks": [_disk_report(pool, i, _faulty_of(faulty, i, p))
                                              for i, p in targets]}
    if op == "fault_list":
        return [
            _disk_report(pool, disk_id, faulty[disk.path])
            for disk_id, disk in sorted(pool.disks.items())
            if disk.path in faulty
        ]
    raise InvalidInput(f"unknown request {op!r}")


def _find_disk(pool: Pool, text: Any) -> tuple[int, str]:
    """A disk of the mounted pool by id, path or file name: (disk id, device path)."""
    if isinstance(text, bool) or not isinstance(text, (str, int)) or text == "":
        raise InvalidInput("name a disk by its id (see `pool status`) or its path")
    text = str(text)
    disks = pool.disks
    chosen: list[int] = []
    if text.isdigit():
        if int(text) in disks:
            chosen = [int(text)]
    else:
        real = os.path.realpath(text)
        chosen = [i for i, d in disks.items() if os.path.realpath(d.path) == real]
        if not chosen:  # a bare file name: disk2.img or disk2
            chosen = [
                i for i, d in disks.items()
                if text in (os.path.basename(d.path), os.path.splitext(os.path.basename(d.path))[0])
            ]
    if not chosen:
        raise InvalidInput(f"pool {pool.name!r} has no disk {text!r} (see `pool status`)")
    if len(chosen) > 1:
        raise InvalidInput(f"{text!r} names several disks ({', '.join(map(str, chosen))}): "
                           "use the disk id")
    disk_id = chosen[0]
    return disk_id, disks[disk_id].path


def _faulty_of(faulty: Mapping[str, FaultyDevice], disk_id: int, path: str) -> FaultyDevice:
    device = faulty.get(path)
    if device is None:
        raise InvalidInput(f"disk {disk_id} ({path}) was not present at mount: there is no "
                           "device to inject faults into")
    return device


def _disk_report(pool: Pool, disk_id: int, device: FaultyDevice) -> dict[str, Any]:
    report: dict[str, Any] = {"id": disk_id, "state": pool.disks[disk_id].record.state}
    report.update(device.fault_state())
    return report
