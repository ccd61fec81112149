"""The bring-up the daemon and the crash simulation share (blockspace/service/bringup.py), on
memory disks: what a mount finds and starts before it serves anything, and the resync of
what an unclean stop left dirty."""

import logging
import random

import pytest
import trio

from blockspace.errors import BlockspaceError
from blockspace.geometry.layouts import LayoutSpec
from blockspace.pool.pool import Pool
from blockspace.service.bringup import bring_up, resync_dirty_regions, resync_in_background
from blockspace.testing import crashsim
from blockspace.testing.memory_device import MemoryDevice
from blockspace.tiering.admin import create_tiered, parse_tier
from blockspace.volume.volume import Volume

KiB = 1 << 10
MiB = 1 << 20
MEDIA = ["ssd", "ssd", "hdd", "hdd", "hdd"]
MIRROR = LayoutSpec("mirror", 1, copies=2, interleave=64 * KiB)


async def unclean_pool() -> tuple[list[MemoryDevice], bytes, str]:
    """A pool with a plain mirror volume "plain" and a tiered volume "v", stopped uncleanly
    after a write to "plain": the write-intent log still holds the write's region."""
    devices = [MemoryDevice(12 * MiB, path=f"mem{i}") for i in range(len(MEDIA))]
    pool = await Pool.create("t", devices, media=MEDIA, slab_size=MiB, meta_slot_size=128 * KiB)
    await pool.enable_intent_log()
    await create_tiered(pool, "v", [parse_tier("ssd:1M:mirror-2"), parse_tier("hdd:3M:parity-1")],
                        unit=64 * KiB, interleave=16 * KiB)
    volume = Volume(pool, await pool.create_volume("plain", 2 * MiB, MIRROR, "thin"))
    data = random.Random(3).randbytes(256 * KiB)
    await volume.write(100 * KiB, data)
    # Dropped like a killed daemon: no intent cleaner ran and no clean stop, so the region
    # stays dirty (closing the pool would close the devices too).
    return devices, data, pool.uuid


def test_bring_up_opens_the_pool_as_the_daemon_serves_it() -> None:
    async def main() -> None:
        devices, data, uuid = await unclean_pool()
        # A disk set of another pool at the registered paths is never served.
        with pytest.raises(BlockspaceError, match="no disk of this pool was found"):
            await bring_up(devices, expect_uuid="00000000-0000-4000-8000-000000000000")
        present = devices[:-1]  # the last hdd is gone
        pool, volumes = await bring_up(present, expect_uuid=uuid, io_timeout=7.5)
        assert pool.io_timeout == 7.5
        assert pool.intent is not None  # the write-intent log runs
        assert pool.disks[len(devices) - 1].record.state == "missing"  # recorded, not skipped
        record = pool.metadata.volume("v")
        assert record.tiers is not None
        # Plain volumes only: the tiered one is served on top of its (hidden) tier volumes.
        assert sorted(volumes) == sorted(["plain", record.tiers.ssd, record.tiers.hdd])
        plain = volumes["plain"]
        assert plain.pending_resync  # what the unclean stop left dirty, picked up
        await resync_dirty_regions(plain)
        assert plain.pending_resync == set()
        assert await plain.read(100 * KiB, len(data)) == data
        await resync_dirty_regions(plain)  # nothing left to do: a no-op
        await pool.close_intent_log()

    trio.run(main)


def test_a_failed_background_resync_is_logged_and_the_daemon_goes_on(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def main() -> None:
        devices, _, _ = await unclean_pool()
        pool, volumes = await bring_up(devices)
        plain = volumes["plain"]
        pending = set(plain.pending_resync)
        assert pending

        async def fail() -> int:
            await trio.lowlevel.checkpoint()
            raise BlockspaceError("no disk answers")

        # The volume's own method cannot be patched where volume.py is compiled (mypyc's
        # classes take no new attributes): its region resync can.
        monkeypatch.setattr(plain.region_resync, "resync_all", fail)
        with pytest.raises(BlockspaceError, match="no disk answers"):
            await resync_dirty_regions(plain)  # the crash checks see the error itself
        with caplog.at_level(logging.INFO, logger="blockspace.service.bringup"):
            await resync_in_background(plain)  # the daemon's task: logged, not raised
        assert "volume plain: resyncing 1 dirty regions" in caplog.text
        assert "volume plain: resync stopped: no disk answers" in caplog.text
        assert "resync done" not in caplog.text
        assert plain.pending_resync == pending  # still to do, at the next I/O to it

    trio.run(main)


def test_the_crash_simulation_mounts_through_the_same_bring_up() -> None:
    async def main() -> None:
        devices, data, _ = await unclean_pool()
        pool, volume = await crashsim.mount_like_daemon(devices, "plain")
        assert pool.intent is not None
        assert volume.name == "plain"
        assert volume.pending_resync
        await crashsim.settle_after_reopen(pool, volume)
        assert volume.pending_resync == set()
        assert await volume.read(100 * KiB, len(data)) == data
        with pytest.raises(BlockspaceError, match="no volume 'nope'"):
            await crashsim.mount_like_daemon(devices, "nope")

    trio.run(main)
