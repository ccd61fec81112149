"""Scrub, in-process on memory disks: finds and repairs rot, reports what it cannot fix."""

import random
import re

import pytest
import trio
import trio.testing

from blockspace.errors import Unrecoverable
from blockspace.geometry.layouts import LayoutSpec, code_position
from blockspace.ondisk.checksums import entries_for
from blockspace.pool.pool import Pool
from blockspace.repair.scrub import Scrubber, ScrubProgress, scrub_slab
from blockspace.testing.memory_device import MemoryDevice
from blockspace.volume.volume import Volume

MiB = 1 << 20
LAYOUTS = {
    "mirror-2": LayoutSpec("mirror", 1, copies=2, interleave=16384),
    "mirror-3": LayoutSpec("mirror", 1, copies=3, interleave=16384),
    "parity-1": LayoutSpec("parity", 3, parity=1, interleave=16384),
    "parity-2": LayoutSpec("parity", 2, parity=2, interleave=16384),
}


async def make(spec: LayoutSpec, disks: int = 5) -> tuple[Pool, Volume, list[MemoryDevice]]:
    devices = [MemoryDevice(12 * MiB, path=f"mem{i}") for i in range(disks)]
    pool = await Pool.create("s", devices, media=["hdd"] * disks, slab_size=MiB,
                             meta_slot_size=64 << 10)
    record = await pool.create_volume("v", 2 * spec.slab_data_size(MiB), spec, "thin")
    volume = Volume(pool, record)
    return pool, volume, devices


def extent_of(pool: Pool, volume: Volume, slab: int, position: int) -> tuple[MemoryDevice, int]:
    disk_id, extent = volume.record.slabs[slab][position]
    device = pool.disks[disk_id].device
    assert isinstance(device, MemoryDevice)
    return device, pool.extent_offset(disk_id, extent)


async def scrub_all(volume: Volume) -> dict[str, int]:
    totals = {"checksum_errors": 0, "mismatches": 0, "repaired_blocks": 0, "unrecoverable": 0}
    for slab in sorted(volume.record.slabs):
        report = await scrub_slab(volume, slab)
        totals["checksum_errors"] += report.checksum_errors
        totals["mismatches"] += report.mismatches
        totals["repaired_blocks"] += report.repaired_blocks
        totals["unrecoverable"] += len(report.unrecoverable)
    return totals


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_scrub_repairs_rot_within_tolerance_and_a_second_scrub_finds_nothing(name: str) -> None:
    async def scenario() -> None:
        spec = LAYOUTS[name]
        pool, volume, devices = await make(spec)
        data = random.randbytes(volume.size)
        await volume.write(0, data)
        rng = random.Random(7)
        # Rot on `tolerance` disks: each stripe loses at most that many columns.
        for device in rng.sample(devices, spec.tolerance):
            for _ in range(300):
                device.data[rng.randrange(MiB, len(device.data) - 4096)] ^= 0x10
        first = await scrub_all(volume)
        assert first["checksum_errors"] > 0
        assert first["repaired_blocks"] > 0
        assert first["unrecoverable"] == 0
        second = await scrub_all(volume)
        assert second == {"checksum_errors": 0, "mismatches": 0, "repaired_blocks": 0,
                          "unrecoverable": 0}
        for device in devices:
            device.failed = False
        assert await volume.read(0, volume.size) == data

    trio.run(scenario)


def test_scrub_lists_unrecoverable_ranges_beyond_tolerance_by_volume_offset() -> None:
    async def scenario() -> None:
        spec = LAYOUTS["mirror-2"]
        pool, volume, _ = await make(spec)
        await volume.write(0, b"k" * volume.size)
        target = 3 * 4096 + 100  # a byte inside block 3 of slab 0
        for position in (0, 1):
            device, base = extent_of(pool, volume, 0, position)
            device.data[base + target] ^= 0xFF
        totals = await scrub_slab(volume, 0)
        assert totals.unrecoverable == [("v", 3 * 4096, 4096)]
        assert totals.checksum_errors == 2
        with pytest.raises(Unrecoverable, match=re.escape(
                "volume 'v': no good copy of slab 0 at extent offset 12288")):
            await volume.read(3 * 4096, 10)
        assert await volume.read(0, 3 * 4096) == b"k" * (3 * 4096)  # the rest still reads

    trio.run(scenario)


def test_scrub_finds_parity_that_does_not_match_its_data() -> None:
    async def scenario() -> None:
        spec = LAYOUTS["parity-1"]
        pool, volume, _ = await make(spec, disks=4)
        await volume.write(0, random.randbytes(spec.interleave * spec.columns))
        # Stale parity with a matching checksum: only a comparison with the data shows it.
        device, base = extent_of(pool, volume, 0, code_position(spec, 0, spec.columns))
        stale = random.randbytes(spec.interleave)
        device.data[base : base + spec.interleave] = stale
        disk_id, extent = volume.record.slabs[0][code_position(spec, 0, spec.columns)]
        await pool.checksums.write(disk_id, extent, 0, entries_for(stale))
        report = await scrub_slab(volume, 0)
        assert report.mismatches == 1
        assert report.checksum_errors == 0
        assert (await scrub_slab(volume, 0)).mismatches == 0

    trio.run(scenario)


def test_scrubber_pauses_resumes_cancels_and_resumes_from_saved_state() -> None:
    async def scenario() -> None:
        spec = LAYOUTS["mirror-2"]
        _, volume, _ = await make(spec)
        await volume.write(0, b"x" * volume.size)
        saved: list[dict[str, object]] = []
        scrubber = Scrubber(lambda: {"v": volume}, lambda p: saved.append(p.to_state()))
        scrubber.plan(None, rate_limit=MiB)  # 1 MiB/s: two 1 MiB slabs (x2 copies) take ~4 s
        assert scrubber.progress.total_slabs == 2
        async with trio.open_nursery() as nursery:
            nursery.start_soon(scrubber.run)
            await trio.sleep(0.5)
            scrubber.pause()
            assert scrubber.progress.state == "paused"
            done = scrubber.progress.done_slabs
            await trio.sleep(60)
            assert scrubber.progress.done_slabs <= done + 1  # at most the slab in progress
            scrubber.resume()
            await scrubber.finished.wait()
        assert scrubber.progress.state == "done"
        assert scrubber.progress.done_slabs == 2
        # An interrupted scrub picks up its cursor after a restart.
        interrupted = ScrubProgress.from_state(saved[0])
        interrupted.state = "running"
        restarted = Scrubber(lambda: {"v": volume}, lambda p: None, interrupted)
        await restarted.run()
        assert restarted.progress.state == "done"
        assert restarted.progress.done_slabs == 2
        cancelled = Scrubber(lambda: {"v": volume}, lambda p: None)
        cancelled.plan("v", rate_limit=1024)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(cancelled.run)
            await trio.sleep(1)
            cancelled.cancel()
        assert cancelled.progress.state == "cancelled"
        assert cancelled.progress.done_slabs < 2

    trio.run(scenario, clock=trio.testing.MockClock(autojump_threshold=0))


def test_a_single_parity_row_that_cannot_tell_its_stale_column_is_reported_not_rewritten(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Issue 17 item 3: repair only towards verified data. Column 0 of a 2+1 row lost its
    last write (its older bytes and entries are back), and column 1 legitimately holds an
    older write too: both are behind the parity, and with one parity nothing can tell
    which one lost the write. The scrub reports the row's range and rewrites nothing (the
    old code recomputed the parity from the stale column: the write was lost for good)."""
    async def scenario() -> None:
        spec = LayoutSpec("parity", 2, parity=1, interleave=16384)
        pool, volume, devices = await make(spec, disks=3)
        unit = spec.interleave
        await volume.write(0, random.randbytes(2 * unit))  # the whole row: write A
        position = code_position(spec, 0, 0)
        device, base = extent_of(pool, volume, 0, position)
        disk_id, extent = volume.record.slabs[0][position]
        older = bytes(device.data[base : base + unit])
        older_entries = await pool.checksums.read(disk_id, extent, 0, unit // 4096)
        await volume.write(0, random.randbytes(unit))  # column 0 only: write B
        device.data[base : base + unit] = older  # ... which its disk lost
        await pool.checksums.write(disk_id, extent, 0, older_entries)
        images = [bytes(d.data) for d in devices]
        report = await scrub_slab(volume, 0)
        assert report.unrecoverable == [("v", 0, 2 * unit)]
        assert report.repaired_blocks == 0
        assert [bytes(d.data) for d in devices] == images
        assert "slab 0 row 0 unrecoverable" in caplog.text
        with pytest.raises(Unrecoverable, match="could be the stale ones"):
            await volume.read(0, 4096)

    trio.run(scenario)
