"""Bringing a pool into service: what a mount does before it serves anything.

One sequence, used by the daemon (blockspace/service/daemon.py) and by the power-cut
simulation (blockspace/testing/crashsim.py), so a crash test remounts exactly the way
`blockspace mount` does.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence

from blockspace.disks.devices import Device
from blockspace.errors import BlockspaceError
from blockspace.pool.label_copies import repair_label_copies
from blockspace.pool.pool import Pool
from blockspace.volume.volume import Volume

log = logging.getLogger(__name__)


async def bring_up(
    devices: Sequence[Device], *, expect_uuid: str | None = None, io_timeout: float | None = None,
    claim: Callable[[Pool], Awaitable[None]] | None = None,
) -> tuple[Pool, dict[str, Volume]]:
    """Open the pool on `devices`, take it for writing with `claim` (the daemon's writer
    lease, blockspace/pool/lease.py: before anything is written), record its absent disks
    as missing, rewrite damaged label copies from the good ones (`label_copies.py`), start
    the write-intent log (which learns the regions an unclean stop left
    dirty) and build its plain volumes, by name; each picks up its dirty regions for
    `resync_dirty_regions`.
    Tiered volumes are served on top of their (hidden) tier volumes, by the tier service.
    The caller still owns `devices` (and closes them if this raises)."""
    pool = await Pool.open(devices, expect_uuid=expect_uuid)
    if io_timeout is not None:
        pool.io_timeout = io_timeout
    if claim is not None:
        await claim(pool)
    await pool.note_missing_disks()
    await repair_label_copies(pool)  # a damaged label copy, rewritten from the good one
    await pool.enable_intent_log()
    volumes = {v.name: Volume(pool, v) for v in pool.metadata.volumes if v.tiers is None}
    return pool, volumes


async def resync_dirty_regions(volume: Volume) -> None:
    """Resync what an unclean stop left dirty in `volume`; nothing to do after a clean one.
    The daemon runs it in the background (I/O to a region still pending resyncs it first,
    so the volume is online meanwhile). Raises the BlockspaceError that stopped it."""
    if volume.pending_resync:
        log.info("volume %s: resyncing %d dirty regions", volume.name, len(volume.pending_resync))
        await volume.resync_pending()
        log.info("volume %s: resync done", volume.name)


async def resync_in_background(volume: Volume) -> None:
    """`resync_dirty_regions` as a daemon task: a failure is logged and serving goes on;
    the regions not done stay pending (I/O to one resyncs it first)."""
    try:
        await resync_dirty_regions(volume)
    except BlockspaceError as error:
        log.error("volume %s: resync stopped: %s", volume.name, error)
