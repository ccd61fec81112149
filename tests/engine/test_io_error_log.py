"""Every I/O error line in the log names the disk, the offset, the length and the errno
(issue 18 item 3): a read error injected by the fault layer, retried and served from the
other copy, must leave lines an operator can match against the drive's own log."""

import logging
import re

import pytest
import trio

from blockspace.disks.faults import FaultSpec, FaultyDevice
from blockspace.geometry.layouts import LayoutSpec
from blockspace.pool.pool import Pool
from blockspace.testing.memory_device import MemoryDevice
from blockspace.volume.volume import Volume

MiB = 1 << 20
MIRROR = LayoutSpec("mirror", 1, copies=2, interleave=16384)


def test_a_read_error_is_logged_with_disk_offset_length_and_errno(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def scenario() -> tuple[int, int]:
        devices = [FaultyDevice(MemoryDevice(12 * MiB, path=f"mem{i}")) for i in range(2)]
        pool = await Pool.create("f", devices, media=["hdd"] * 2, slab_size=MiB,
                                 meta_slot_size=64 << 10)
        volume = Volume(pool, await pool.create_volume("v", 2 * MiB, MIRROR, "thin"))
        await volume.write(0, b"s" * 65536)
        disk_id, extent = volume.record.slabs[0][0]
        offset = pool.extent_offset(disk_id, extent)
        device = pool.disks[disk_id].device
        assert isinstance(device, FaultyDevice)
        device.set_spec(FaultSpec(read_error=1.0, ranges=((offset, 4096),)))
        with caplog.at_level(logging.WARNING):
            assert await volume.read(0, 65536) == b"s" * 65536
        return disk_id, offset

    disk_id, offset = trio.run(scenario)
    lines = [r.getMessage() for r in caplog.records if "failed at" in r.getMessage()]
    retries = [line for line in lines if "retrying" in line]
    final = [line for line in lines if "served from redundancy" in line]
    assert retries, caplog.text
    assert final, caplog.text
    for line in retries + final:
        assert line.startswith(f"disk {disk_id}: read"), line
        match = re.search(r"offset (\d+) length (\d+), errno 5 \(EIO\)", line)
        assert match, line
        start, length = int(match.group(1)), int(match.group(2))
        assert start <= offset < start + length  # the range that holds the bad sector
    assert "attempt 2 of 3" in retries[0]
    assert "(extent " in final[0]


def test_a_write_error_is_logged_with_disk_offset_length_and_errno(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def scenario() -> tuple[int, int]:
        devices = [FaultyDevice(MemoryDevice(12 * MiB, path=f"mem{i}")) for i in range(2)]
        pool = await Pool.create("f", devices, media=["hdd"] * 2, slab_size=MiB,
                                 meta_slot_size=64 << 10)
        volume = Volume(pool, await pool.create_volume("v", 2 * MiB, MIRROR, "thin"))
        await volume.write(0, b"a" * 65536)
        disk_id, extent = volume.record.slabs[0][0]
        device = pool.disks[disk_id].device
        assert isinstance(device, FaultyDevice)
        device.set_spec(FaultSpec(write_error=1.0))
        with caplog.at_level(logging.WARNING):
            await volume.write(8192, b"b" * 16384)
        return disk_id, pool.extent_offset(disk_id, extent)

    disk_id, extent_at = trio.run(scenario)
    lines = [r.getMessage() for r in caplog.records
             if r.getMessage().startswith(f"disk {disk_id}: write")]
    assert lines, caplog.text
    for line in lines:
        assert f"offset {extent_at + 8192} length 16384, errno 5 (EIO)" in line, line
    assert any("taken out of service" in line for line in lines)
