"""Fresh disks only (DESIGN.md invariant 7, issue 16 item 5): a member whose committed state is
older than the pool's never serves data until it has caught up.

Real image files in tmp_path. The pool goes through the daemon's life cycle in-process
(open, record absent disks, write-intent log; at the end the clean stop), without FUSE.
A disk image is copied aside, newer data is written over the whole volume, the pool is
stopped, the old copy is put back, and the pool is opened again: the copy is a member with
the right label and valid metadata of an older generation. Served as online, its column is
stale (about a third of the blocks of a parity-1 volume on 3 disks read old data) and a
scrub "repairs" parity from it, so the newer data is gone for good.
"""

import random
import shutil
from collections.abc import Sequence
from pathlib import Path

import pytest
import trio

from blockspace.admin.manage import DiskManager
from blockspace.admin.pools import pool_status
from blockspace.admin.registry import Registry
from blockspace.disks.devices import FileDevice
from blockspace.geometry.layouts import LayoutSpec
from blockspace.pool.pool import Pool
from blockspace.repair.readmit import catch_up_disk, prepare
from blockspace.repair.rebuild import RebuildProgress
from blockspace.repair.scrub import ScrubReport, scrub_slab
from blockspace.volume.volume import Volume

MiB = 1 << 20
BLOCK = 4096
DISKS = 3
DISK_SIZE = 16 * MiB
VOLUME_SIZE = 4 * MiB  # 1024 blocks
LAYOUTS = {
    "parity-1": LayoutSpec("parity", 2, parity=1, interleave=16384),
    "mirror-2": LayoutSpec("mirror", 1, copies=2, interleave=16384),
}


def images(tmp_path: Path) -> list[Path]:
    paths = []
    for i in range(DISKS):
        path = tmp_path / f"disk{i}.img"
        with open(path, "wb") as handle:
            handle.truncate(DISK_SIZE)
        paths.append(path)
    return paths


class Mounted:
    """A pool in service the way the daemon brings it up and stops it (no FUSE)."""

    def __init__(self, pool: Pool, devices: list[FileDevice]) -> None:
        self.pool = pool
        self.devices = devices
        self.volume = Volume(pool, pool.volume("v"))

    @classmethod
    async def start(cls, paths: Sequence[Path]) -> "Mounted":
        devices = [FileDevice(str(path)) for path in paths]
        pool = await Pool.open(devices)
        await pool.note_missing_disks()
        await pool.enable_intent_log()
        return cls(pool, devices)

    async def stop(self) -> None:
        await self.pool.close_intent_log()  # the daemon's clean stop
        self.close()

    def close(self) -> None:
        self.pool.close()
        for device in self.devices:
            device.close()


async def create(paths: Sequence[Path], spec: LayoutSpec) -> None:
    devices = [FileDevice(str(path)) for path in paths]
    try:
        pool = await Pool.create("fresh", devices, media=["hdd"] * DISKS, slab_size=MiB,
                                 meta_slot_size=64 << 10)
        await pool.create_volume("v", VOLUME_SIZE, spec, "fixed")
        await pool.flush()
    finally:
        for device in devices:
            device.close()


def wrong_blocks(data: bytes | bytearray, expected: bytes) -> int:
    return sum(data[i : i + BLOCK] != expected[i : i + BLOCK] for i in range(0, len(data), BLOCK))


async def scrub_all(volume: Volume) -> ScrubReport:
    report = ScrubReport()
    for slab in sorted(volume.record.slabs):
        report.add(await scrub_slab(volume, slab, repair=True))
    return report


@pytest.mark.parametrize("copied", ["unmounted", "mounted"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_a_member_put_back_from_an_older_copy_never_serves_until_caught_up(
    tmp_path: Path, layout: str, copied: str
) -> None:
    spec = LAYOUTS[layout]
    paths = images(tmp_path)
    old = random.Random(1).randbytes(VOLUME_SIZE)
    new = random.Random(2).randbytes(VOLUME_SIZE)
    aside = tmp_path / "disk2.old"

    async def scenario() -> None:
        await create(paths, spec)
        mounted = await Mounted.start(paths)
        await mounted.volume.write(0, old)
        await mounted.volume.flush()
        if copied == "mounted":  # a copy of the image taken while the pool is in service
            shutil.copyfile(paths[2], aside)
        await mounted.stop()
        if copied == "unmounted":
            shutil.copyfile(paths[2], aside)

        mounted = await Mounted.start(paths)
        await mounted.volume.write(0, new)
        await mounted.volume.flush()
        await mounted.stop()
        shutil.copyfile(aside, paths[2])  # the old copy is put back

        mounted = await Mounted.start(paths)
        pool, volume = mounted.pool, mounted.volume
        try:
            disk = pool.disks[2].record
            # Not online on arrival: out of service, and `pool status` says why.
            assert disk.state != "online", "a stale copy came back online"
            shown = pool_status(pool)["disks"][2]
            assert shown["state"] == "missing"
            assert "stale" in shown["state_reason"]
            assert "older" in shown["state_reason"]
            served = await volume.read(0, VOLUME_SIZE)
            wrong = wrong_blocks(served, new)
            assert wrong == 0, f"{wrong} of {VOLUME_SIZE // BLOCK} blocks read stale data"
            # Scrub repairs nothing from the stale column (it is not a source at all).
            report = await scrub_all(volume)
            assert (report.repaired_blocks, report.mismatches) == (0, 0), report
            assert await volume.read(0, VOLUME_SIZE) == new

            # The catch-up (what the daemon's resume runs at mount, `disk online` offline).
            device = pool.disks[2].returned
            assert device is not None
            await prepare(pool, 2, device)
            assert pool.disks[2].record.state == "resyncing"
            await catch_up_disk(pool, {"v": volume}, 2, RebuildProgress(state="running"))
            assert pool.disks[2].record.state == "online"
            report = await scrub_all(volume)
            assert (report.checksum_errors, report.mismatches) == (0, 0), report
            assert await volume.read(0, VOLUME_SIZE) == new
        finally:
            await mounted.stop()

        # Disk 2 now carries the newer data itself: it serves with disk 0 gone.
        mounted = await Mounted.start(paths[1:])
        try:
            assert mounted.pool.disks[2].record.state == "online"
            assert mounted.pool.disks[0].record.state == "missing"
            assert await mounted.volume.read(0, VOLUME_SIZE) == new
        finally:
            mounted.close()

    trio.run(scenario)


# ---- one generation behind: a commit cut short, or a copy? -------------------------------


def metadata_area(pool: Pool, disk_id: int) -> tuple[int, int]:
    geometry = pool.disks[disk_id].geometry
    return geometry.meta_offset, 2 * geometry.meta_slot_size


def read_area(path: Path, area: tuple[int, int]) -> bytes:
    with open(path, "rb") as handle:
        handle.seek(area[0])
        return handle.read(area[1])


def write_area(path: Path, area: tuple[int, int], data: bytes) -> None:
    with open(path, "r+b") as handle:
        handle.seek(area[0])
        handle.write(data)


async def commit_missing_disk2(paths: list[Path], commits: int, *, seal: bool) -> Pool:
    """Mount, then `commits` commits (the last sealed if `seal`) that never reach disk 2's
    metadata slots (as if each was cut short before writing there, or disk 2 is put back
    from a copy taken before them); stop uncleanly (kill -9); open again."""
    await create(paths, LAYOUTS["parity-1"])
    mounted = await Mounted.start(paths)
    area = metadata_area(mounted.pool, 2)
    before = read_area(paths[2], area)
    for n in range(commits):
        await mounted.pool.commit(seal=seal and n == commits - 1)
    write_area(paths[2], area, before)
    mounted.close()  # no clean stop
    return await Pool.open([FileDevice(str(path)) for path in paths])


def test_a_disk_one_generation_behind_an_unsealed_commit_stays_in_service(
    tmp_path: Path,
) -> None:
    """A crash during a commit leaves the disks it had not reached one generation behind;
    that commit was never acknowledged, and they hold every write: they stay online (the
    crash tests cut right after each metadata write and need them)."""

    async def scenario() -> None:
        pool = await commit_missing_disk2(images(tmp_path), 1, seal=False)
        try:
            assert [d.record.state for d in pool.disks.values()] == ["online"] * DISKS
        finally:
            pool.close()

    trio.run(scenario)


@pytest.mark.parametrize(("commits", "seal"), [(1, True), (2, False)],
                         ids=["behind-a-sealed-generation", "two-generations-behind"])
def test_a_disk_behind_a_complete_commit_is_out_of_service(
    tmp_path: Path, commits: int, seal: bool
) -> None:
    """Behind a sealed generation (it reached every disk) or by two generations, a disk
    missed a commit that completed: stale, taken out with its reason, whatever its label
    says."""

    async def scenario() -> None:
        pool = await commit_missing_disk2(images(tmp_path), commits, seal=seal)
        try:
            disk = pool.disks[2]
            assert disk.record.state == "missing"
            assert disk.device is None
            assert disk.returned is not None
            newest = pool.metadata.generation
            assert f"generation {newest - commits}, older than the pool's {newest}" in \
                disk.record.state_reason
            assert disk.record.missed_since > 0
            assert [pool.disks[d].record.state for d in (0, 1)] == ["online", "online"]
        finally:
            pool.close()

    trio.run(scenario)


def test_a_disk_without_valid_metadata_is_failed_until_readmitted(tmp_path: Path) -> None:
    """Nothing tells what a disk without a valid metadata copy holds: failed, and `disk
    online` (readmit) rebuilds it whole."""
    paths = images(tmp_path)

    async def scenario() -> None:
        await create(paths, LAYOUTS["parity-1"])
        mounted = await Mounted.start(paths)
        area = metadata_area(mounted.pool, 2)
        await mounted.stop()
        write_area(paths[2], area, bytes(area[1]))
        pool = await Pool.open([FileDevice(str(path)) for path in paths])
        try:
            record = pool.disks[2].record
            assert record.state == "failed"
            assert "no valid metadata copy" in record.state_reason
            assert "`disk online`" in record.state_reason
        finally:
            pool.close()

    trio.run(scenario)


def test_the_mount_catches_a_stale_disk_up_by_itself(tmp_path: Path) -> None:
    """What the daemon runs at mount (DiskManager.resume) re-admits a stale disk through
    the returning-disk catch-up: resynced, then online, holding the newer data."""
    paths = images(tmp_path)
    new = random.Random(3).randbytes(VOLUME_SIZE)
    aside = tmp_path / "disk2.old"

    async def scenario() -> None:
        await create(paths, LAYOUTS["parity-1"])
        shutil.copyfile(paths[2], aside)
        mounted = await Mounted.start(paths)
        await mounted.volume.write(0, new)
        await mounted.stop()
        shutil.copyfile(aside, paths[2])

        mounted = await Mounted.start(paths)
        try:
            assert mounted.pool.disks[2].record.state == "missing"
            async with trio.open_nursery() as nursery:
                manager = DiskManager(mounted.pool, lambda: {"v": mounted.volume},
                                      Registry(tmp_path / "state"), "fresh", nursery)
                await manager.resume()
                await manager.rebuilder.finished.wait()
            assert manager.rebuilder.progress.state == "done", manager.rebuilder.progress
            assert mounted.pool.disks[2].record.state == "online"
        finally:
            await mounted.stop()
        mounted = await Mounted.start([paths[0], paths[2]])
        try:
            assert await mounted.volume.read(0, VOLUME_SIZE) == new
        finally:
            mounted.close()

    trio.run(scenario)
