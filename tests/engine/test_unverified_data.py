"""Never serve or repair from unverified data (issue 17 items 1-3, DESIGN.md invariant 8), on
image files, for every layout with redundancy.

Three faults that pass a plain checksum test, each on one extent of one disk while the pool
is closed: the extent zeroed (data and checksum area: a hole punched into the image, a thin
store returning zeros), an older copy of the extent's bytes restored (a stale column), and
a write the disk silently dropped (`FaultSpec(drop_writes=True)`). After each, on a fresh
open: a read returns the data written, the damage is counted against that disk, a scrub
repairs it from the columns that verify, finds nothing unrecoverable, a second scrub finds
nothing, and the data is intact. (A simple volume has no other column to contradict its
only one: these faults are beyond what it can see.)
"""

import os
import random
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio

from blockspace.disks.devices import Device, FileDevice
from blockspace.disks.faults import FaultSpec, FaultyDevice
from blockspace.geometry.layouts import LayoutSpec
from blockspace.pool.pool import Pool
from blockspace.repair.scrub import ScrubReport, scrub_slab
from blockspace.volume.volume import Volume

MiB = 1 << 20
SLAB = MiB
DISK = 12 * MiB
LAYOUTS = {  # each as wide as its pool: the damaged disk holds a column of every slab
    "mirror-2": (LayoutSpec("mirror", 1, copies=2, interleave=16384), 2),
    "mirror-3": (LayoutSpec("mirror", 1, copies=3, interleave=16384), 3),
    "parity-1": (LayoutSpec("parity", 2, parity=1, interleave=16384), 3),
    "parity-2": (LayoutSpec("parity", 2, parity=2, interleave=16384), 4),
}
DAMAGED = 0  # the slab position whose extent is damaged


class Images:
    """A pool on image files, opened and closed again as a mount would."""

    def __init__(self, tmp_path: Path, disks: int) -> None:
        self.paths = [tmp_path / f"d{i}.img" for i in range(disks)]
        for path in self.paths:
            path.write_bytes(b"")
            os.truncate(path, DISK)
        self.devices: list[Device] = []

    def open_devices(self, faulty: bool = False) -> list[Device]:
        self.devices = [FaultyDevice(FileDevice(str(p))) if faulty else FileDevice(str(p))
                        for p in self.paths]
        return self.devices

    def close(self, pool: Pool) -> None:
        pool.close()
        for device in self.devices:
            device.close()


def where(pool: Pool, volume: Volume, slab: int = 0) -> tuple[int, int, int]:
    """(disk index, byte offset, length) of the damaged extent: data and checksum area."""
    disk_id, extent = volume.record.slabs[slab][DAMAGED]
    return disk_id, pool.extent_offset(disk_id, extent), pool.disks[disk_id].geometry.extent_stride


def disk_index(pool: Pool, images: Images, disk_id: int) -> int:
    device = pool.disks[disk_id].device
    assert device is not None
    return [str(p) for p in images.paths].index(device.path)


async def scrub(volume: Volume) -> ScrubReport:
    report = ScrubReport()
    for slab in sorted(volume.record.slabs):
        report.add(await scrub_slab(volume, slab))
    return report


async def write_sparse(volume: Volume, model: bytearray, rng: random.Random, count: int) -> None:
    """Small writes here and there (as a file system makes them): partial rows."""
    for _ in range(count):
        offset = rng.randrange(0, volume.size - 65536) // 4096 * 4096
        data = rng.randbytes(4096 * rng.randrange(1, 5))
        await volume.write(offset, data)
        model[offset : offset + len(data)] = data


async def write_rows(volume: Volume, model: bytearray, rng: random.Random, count: int) -> None:
    """Whole-row overwrites: every data column of the row takes the write."""
    row = volume.spec.interleave * volume.spec.columns
    for _ in range(count):
        offset = rng.randrange(0, volume.size // row) * row
        data = rng.randbytes(row)
        await volume.write(offset, data)
        model[offset : offset + len(data)] = data


Damage = Callable[[Images, Pool, Volume, bytearray, random.Random], Awaitable[None]]


async def zero_extent(images: Images, pool: Pool, volume: Volume, model: bytearray,
                      rng: random.Random) -> None:
    disk_id, offset, length = where(pool, volume)
    path = images.paths[disk_index(pool, images, disk_id)]
    images.close(pool)
    fd = os.open(path, os.O_RDWR)
    try:
        os.pwrite(fd, bytes(length), offset)
    finally:
        os.close(fd)


async def restore_older_copy(images: Images, pool: Pool, volume: Volume, model: bytearray,
                             rng: random.Random) -> None:
    disk_id, offset, length = where(pool, volume)
    path = images.paths[disk_index(pool, images, disk_id)]
    fd = os.open(path, os.O_RDONLY)
    try:
        older = os.pread(fd, length, offset)
    finally:
        os.close(fd)
    await write_rows(volume, model, rng, 12)
    if volume.spec.kind != "parity":  # single parity cannot tell which of two older
        await write_sparse(volume, model, rng, 10)  # columns lost a write: see the README
    images.close(pool)
    fd = os.open(path, os.O_RDWR)
    try:
        os.pwrite(fd, older, offset)
    finally:
        os.close(fd)


async def drop_one_write(images: Images, pool: Pool, volume: Volume, model: bytearray,
                         rng: random.Random) -> None:
    disk_id, offset, _ = where(pool, volume)
    device = pool.disks[disk_id].device
    assert isinstance(device, FaultyDevice)
    # One whole-row write into the first rows of slab 0, which the damaged disk drops.
    row = volume.spec.interleave * volume.spec.columns
    data = rng.randbytes(2 * row)
    device.set_spec(FaultSpec(drop_writes=True))
    await volume.write(0, data)
    device.set_spec(FaultSpec())
    model[: len(data)] = data
    assert device.statistics().dropped_writes > 0
    images.close(pool)


DAMAGES: dict[str, Damage] = {
    "zeroed": zero_extent,
    "stale": restore_older_copy,
    "lost-write": drop_one_write,
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
@pytest.mark.parametrize("name", sorted(LAYOUTS))
@pytest.mark.parametrize("first", ["read", "scrub"])
def test_damage_that_verifies_is_located_served_counted_and_repaired(
    tmp_path: Path, name: str, damage: str, first: str
) -> None:
    spec, disks = LAYOUTS[name]
    rng = random.Random(f"{name}-{damage}")
    images = Images(tmp_path, disks)

    async def scenario() -> None:
        pool = await Pool.create("p", images.open_devices(faulty=True), media=["hdd"] * disks,
                                 slab_size=SLAB, meta_slot_size=64 << 10)
        record = await pool.create_volume("v", 2 * spec.slab_data_size(SLAB), spec, "thin")
        volume = Volume(pool, record)
        model = bytearray(volume.size)
        await write_sparse(volume, model, rng, 40)  # partial rows, as a file system writes
        await write_rows(volume, model, rng, 6)
        if damage != "zeroed":  # the rest of slab 0 written whole
            await volume.write(0, model[: volume.slab_data_size])
        # (No read before the damage: a read stamps the rows it judges, which would hide
        # whether the writes alone leave every row able to tell a zeroed column.)
        disk_id, _, _ = where(pool, volume)
        await DAMAGES[damage](images, pool, volume, model, rng)

        pool = await Pool.open(images.open_devices())
        volume = Volume(pool, pool.volume("v"))
        try:
            if first == "read":
                assert await volume.read(0, volume.size) == model
                assert pool.disks[disk_id].errors["checksum"] > 0
                others = [d.errors["checksum"] for i, d in pool.disks.items() if i != disk_id]
                assert others == [0] * (disks - 1)
            report = await scrub(volume)
            assert report.unrecoverable == []
            if first == "scrub":
                assert report.checksum_errors + report.mismatches > 0
                assert report.repaired_blocks > 0
                assert pool.disks[disk_id].errors["checksum"] > 0
            again = await scrub(volume)
            assert (again.checksum_errors, again.mismatches, again.repaired_blocks,
                    again.unrecoverable) == (0, 0, 0, [])
            assert await volume.read(0, volume.size) == model
        finally:
            images.close(pool)
        pool = await Pool.open(images.open_devices())  # and it is so on the disks
        volume = Volume(pool, pool.volume("v"))
        try:
            assert await volume.read(0, volume.size) == model
            assert (await scrub(volume)).repaired_blocks == 0
        finally:
            images.close(pool)

    trio.run(scenario)
