"""What the volume does when one disk misbehaves: drops writes, fails reads, or hangs."""

import os
from pathlib import Path

import trio
import trio.testing

from blockspace.disks.faults import FaultSpec, FaultyDevice
from blockspace.geometry.layouts import LayoutSpec
from blockspace.pool.pool import Pool
from blockspace.repair.scrub import scrub_slab
from blockspace.testing.memory_device import MemoryDevice
from blockspace.volume.extent_io import Fault
from blockspace.volume.volume import Volume

MiB = 1 << 20
MIRROR = LayoutSpec("mirror", 1, copies=2, interleave=16384)


async def make(disks: int = 2) -> tuple[Pool, Volume, list[FaultyDevice]]:
    devices = [FaultyDevice(MemoryDevice(12 * MiB, path=f"mem{i}")) for i in range(disks)]
    pool = await Pool.create("f", devices, media=["hdd"] * disks, slab_size=MiB,
                             meta_slot_size=64 << 10)
    record = await pool.create_volume("v", 2 * MiB, MIRROR, "thin")
    return pool, Volume(pool, record), devices


def image_files(directory: Path, count: int, size: int = 24 * MiB) -> list[Path]:
    paths = []
    for i in range(count):
        path = directory / f"d{i}.img"
        path.write_bytes(b"")
        os.truncate(path, size)
        paths.append(path)
    return paths


def copy_device(pool: Pool, volume: Volume, position: int) -> FaultyDevice:
    disk_id, _ = volume.record.slabs[0][position]
    device = pool.disks[disk_id].device
    assert isinstance(device, FaultyDevice)
    return device


def test_a_write_dropped_by_one_disk_is_never_read_back_and_scrub_repairs_it() -> None:
    async def scenario() -> None:
        pool, volume, _ = await make()
        await volume.write(0, b"A" * 65536)
        await volume.flush()
        for position in (0, 1):  # whichever copy a read prefers, it must not win
            liar = copy_device(pool, volume, position)
            liar.set_spec(FaultSpec(drop_writes=True))
            new = bytes([66 + position]) * 65536
            await volume.write(0, new)
            await volume.flush()
            liar.clear()
            assert await volume.read(0, 65536) == new  # the stale copy lost, and was healed
            for slab in volume.record.slabs:
                report = await scrub_slab(volume, slab)
                assert report.mismatches == 0  # the read already repaired it
        # A lost write the reads never touched: scrub finds it and keeps the newer copy.
        liar = copy_device(pool, volume, 1)
        liar.set_spec(FaultSpec(drop_writes=True))
        await volume.write(MiB // 2, b"N" * 8192)
        await volume.flush()
        liar.clear()
        report = await scrub_slab(volume, 0)
        # Found either as stale (older write number) or, while the checksum cache still
        # holds the entry the disk dropped, as a checksum error: both are repaired.
        assert report.mismatches + report.checksum_errors == 2
        assert report.repaired_blocks == 2
        again = await scrub_slab(volume, 0)
        assert again.mismatches + again.checksum_errors == 0
        liar_other = copy_device(pool, volume, 0)
        liar_other.set_spec(FaultSpec(dead=True))  # only the repaired copy is left
        assert await volume.read(MiB // 2, 8192) == b"N" * 8192

    trio.run(scenario)


def test_a_bad_sector_is_served_from_the_other_copy_and_rewritten() -> None:
    async def scenario() -> None:
        pool, volume, _ = await make()
        await volume.write(0, b"s" * 65536)
        device = copy_device(pool, volume, 0)
        disk_id, extent = volume.record.slabs[0][0]
        offset = pool.extent_offset(disk_id, extent)
        device.set_spec(FaultSpec(read_error=1.0, ranges=((offset, 4096),)))
        writes = device.statistics().writes
        assert await volume.read(0, 65536) == b"s" * 65536
        assert device.statistics().writes > writes  # the unreadable copy was rewritten
        assert pool.disks[disk_id].record.state == "online"  # a bad sector is no dead disk

    trio.run(scenario)


def test_a_disk_that_stops_answering_is_failed_after_the_timeout_and_io_goes_on() -> None:
    async def scenario() -> None:
        pool, volume, _ = await make(disks=3)
        await volume.write(0, b"t" * 65536)
        pool.io_timeout = 5.0
        hung = copy_device(pool, volume, 0)
        hung.set_spec(FaultSpec(latency=3600.0))
        started = trio.current_time()
        assert await volume.read(0, 65536) == b"t" * 65536
        await volume.write(0, b"u" * 65536)
        assert trio.current_time() - started < 60  # not an hour
        disk_id, _ = volume.record.slabs[0][0]
        assert pool.disks[disk_id].record.state == "failed"
        assert "within 5s" in pool.disks[disk_id].record.state_reason
        assert await volume.read(0, 65536) == b"u" * 65536

    trio.run(scenario, clock=trio.testing.MockClock(autojump_threshold=0))


def test_a_transient_write_error_is_retried_not_fatal() -> None:
    async def scenario() -> None:
        pool, volume, _ = await make()
        await volume.write(0, b"r" * 4096)
        device = copy_device(pool, volume, 1)
        device.set_spec(FaultSpec(write_error=0.1, seed=5))  # isolated errors, none 3 in a row
        for i in range(20):
            await volume.write(i * 4096, bytes([i]) * 4096)
        disk_id, _ = volume.record.slabs[0][1]
        assert device.statistics().injected_write_errors > 0
        assert pool.disks[disk_id].record.state == "online"
        device.clear()
        for i in range(20):
            assert await volume.read(i * 4096, 4096) == bytes([i]) * 4096

    trio.run(scenario)


def test_fsync_on_a_hung_disk_returns_after_the_timeout_and_fails_that_disk() -> None:
    async def scenario() -> None:
        pool, volume, devices = await make(disks=3)
        await volume.write(0, b"f" * 65536)
        pool.io_timeout = 5.0
        hung = copy_device(pool, volume, 1)
        hung.set_spec(FaultSpec(latency=3600.0))
        started = trio.current_time()
        await volume.flush()
        assert trio.current_time() - started < 60
        disk_id, _ = volume.record.slabs[0][1]
        assert pool.disks[disk_id].record.state == "failed"
        assert await volume.read(0, 65536) == b"f" * 65536

    trio.run(scenario, clock=trio.testing.MockClock(autojump_threshold=0))


def test_a_disk_failing_while_metadata_is_being_committed_does_not_crash_the_commit() -> None:
    async def scenario() -> None:
        pool, volume, devices = await make(disks=3)
        await volume.write(0, b"m" * 4096)
        slow = devices[2]
        slow.set_spec(FaultSpec(latency=1.0))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pool.commit)  # writes metadata to every disk, disk 2 slowly
            await trio.sleep(0.5)
            await pool.mark_failed(2, "test: failed during a commit")  # takes its device away
        assert pool.disks[2].record.state == "failed"
        reopened = await Pool.open([d.inner for d in devices[:2]])
        assert reopened.disks[2].record.state == "failed"

    trio.run(scenario, clock=trio.testing.MockClock(autojump_threshold=0))


def test_a_failure_whose_commit_was_cancelled_is_committed_by_the_next_writer() -> None:
    """Scenario finding 3: the state was set in memory, its commit cancelled with the
    request that ran it; a later write to the failed disk must not be acknowledged until
    a generation records the failure, so a remount never trusts the disk again."""

    async def scenario() -> None:
        pool, volume, devices = await make(disks=3)
        await volume.write(0, b"A" * 65536)
        slow = copy_device(pool, volume, 0)
        slow.set_spec(FaultSpec(latency=0.5))  # the commit is still writing when cancelled
        with trio.move_on_after(0.1):
            await pool.mark_failed(2, "test: first report")
        assert pool.disks[2].record.state == "failed"
        slow.set_spec(FaultSpec())
        await pool.mark_failed(2, "test: second report")  # must commit, not return early
        reopened = await Pool.open([d for i, d in enumerate(devices) if i != 2])
        assert reopened.disks[2].record.state == "failed"
        assert reopened.disks[2].record.missed_since > 0

    trio.run(scenario)


def test_a_disk_absent_at_mount_is_recorded_missing_with_what_it_may_have_missed() -> None:
    async def scenario() -> None:
        pool, volume, devices = await make(disks=3)
        await pool.note_missing_disks()  # first session
        first = pool.metadata.opened_seq
        assert first > 0
        await volume.write(0, b"B" * 65536)
        second = await Pool.open(devices[:2])
        await second.note_missing_disks()
        record = second.disks[2].record
        assert (record.state, record.state_reason) == ("missing", "not found at mount")
        assert 0 < record.missed_since <= first  # every write of the last session is after
        assert second.metadata.opened_seq > first
        third = await Pool.open(devices[:2])
        assert third.disks[2].record.missed_since == record.missed_since

    trio.run(scenario)


def test_repeated_checksum_errors_make_a_disk_failing_but_it_keeps_serving() -> None:
    from blockspace.pool.pool import FAILING_CHECKSUM_ERRORS

    async def scenario() -> None:
        pool, volume, devices = await make(disks=3)
        data = bytes(range(256)) * (2 * MiB // 256)
        await volume.write(0, data)
        await volume.flush()
        rotten = copy_device(pool, volume, 1)
        disk_id = volume.record.slabs[0][1][0]
        rotten.set_spec(FaultSpec(bitflip=1.0))  # every read of it comes back flipped
        scrubs = 0
        while pool.disks[disk_id].record.state == "online":  # one bad block per scrub
            report = await scrub_slab(volume, 0)
            assert report.checksum_errors >= 1  # (a flip in its entries counts too)
            assert await volume.read(0, volume.size) == data  # served from the good copy
            scrubs += 1
            assert scrubs <= FAILING_CHECKSUM_ERRORS
        record = pool.disks[disk_id].record
        assert record.state == "failing"
        assert "failed their checksum" in record.state_reason
        assert pool.disks[disk_id].errors["checksum"] >= FAILING_CHECKSUM_ERRORS
        rotten.set_spec(FaultSpec())
        await volume.write(0, data[:65536])  # still written: its copies stay current
        assert await volume.read(0, volume.size) == data
        reopened = await Pool.open(devices)
        assert reopened.disks[disk_id].record.state == "failing"

    trio.run(scenario)


def test_a_dead_disk_first_noticed_while_zeroing_a_new_slab_does_not_fail_the_write() -> None:
    async def scenario() -> None:
        pool, volume, devices = await make(disks=2)
        await volume.write(0, b"A" * 65536)  # slab 0
        devices[1].set_spec(FaultSpec(dead=True))  # nothing has touched it since
        await volume.write(MiB, b"B" * 65536)  # slab 1: its zeroing finds disk 1 dead
        assert pool.disks[1].record.state == "failed"
        assert await volume.read(MiB, 65536) == b"B" * 65536
        assert await volume.read(0, 65536) == b"A" * 65536

    trio.run(scenario)


def test_a_cancelled_write_leaves_the_checksum_cache_and_the_disk_agreeing(
    tmp_path: Path,
) -> None:
    """A write cancelled with its request (a sibling column failed beyond the tolerance, the
    kernel interrupted it) must not leave checksum entries in the cache that never reached
    the disk, nor data without its entries: it finishes. Seen in the scenario suite as a
    healthy disk turning 'failing' after two others died mid-write."""
    from blockspace.disks.devices import FileDevice

    async def scenario() -> None:
        paths = [str(p) for p in image_files(tmp_path, 2)]
        devices = [FaultyDevice(FileDevice(p)) for p in paths]
        pool = await Pool.create("f", devices, media=["hdd"] * 2, slab_size=4 * MiB,
                                 meta_slot_size=64 << 10)
        volume = Volume(pool, await pool.create_volume("v", 4 * MiB, MIRROR, "fixed"))
        await volume.write(0, b"\1" * (4 * MiB))
        extents = volume.record.slabs[0]
        assert await volume.io.read_checked(extents, 0, 0, 65536)  # its entries now cached
        devices[0].set_spec(FaultSpec(latency=0.2))
        with trio.move_on_after(0.05):
            await volume.io.write_verified(extents, 0, 0, b"\2" * 65536, seq=pool.next_seq())
        devices[0].set_spec(FaultSpec())
        result = await volume.io.read_checked(extents, 0, 0, 65536)
        assert not isinstance(result, Fault), "the cache and the disk disagree"
        pool.close()
        reopened = await Pool.open([FileDevice(p) for p in paths], expect_uuid=pool.uuid)
        result = await Volume(reopened, reopened.volume("v")).io.read_checked(extents, 0, 0, 65536)
        assert not isinstance(result, Fault), "the disk's data and entries disagree"
        reopened.close()

    trio.run(scenario)


def test_a_deleted_image_file_is_taken_out_of_service_as_missing(tmp_path: Path) -> None:
    """Its open descriptor would keep taking writes into an inode that dies at unmount."""
    from blockspace.disks.devices import FileDevice
    from blockspace.repair.watchdog import check_disks

    async def scenario() -> None:
        paths = image_files(tmp_path, 2)
        devices = [FaultyDevice(FileDevice(str(p))) for p in paths]
        pool = await Pool.create("w", devices, media=["hdd"] * 2, slab_size=4 * MiB,
                                 meta_slot_size=64 << 10)
        volume = Volume(pool, await pool.create_volume("v", 4 * MiB, MIRROR, "thin"))
        await volume.write(0, b"x" * 65536)
        assert await check_disks(pool) == []
        paths[1].unlink()
        assert await check_disks(pool) == [1]
        record = pool.disks[1].record
        assert (record.state, record.state_reason) == ("missing", "its image file was deleted")
        await volume.write(0, b"y" * 65536)  # degraded, no error
        assert await volume.read(0, 65536) == b"y" * 65536
        pool.close()
        reopened = await Pool.open([FileDevice(str(paths[0]))])
        assert reopened.disks[1].record.state == "missing"
        reopened.close()

    trio.run(scenario)


def test_an_idle_dead_disk_is_failed_by_the_watchdog_probe() -> None:
    from blockspace.repair.watchdog import PROBE_FAILURES, probe_disks

    async def scenario() -> None:
        pool, volume, devices = await make(disks=3)
        await volume.write(0, b"z" * 65536)
        failures: dict[int, int] = {}
        assert await probe_disks(pool, failures) == []
        devices[2].set_spec(FaultSpec(dead=True))  # nothing reads or writes it now
        for _ in range(PROBE_FAILURES - 1):
            assert await probe_disks(pool, failures) == []
            assert pool.disks[2].record.state == "online"
        assert await probe_disks(pool, failures) == [2]
        assert pool.disks[2].record.state == "failed"
        assert "does not answer reads" in pool.disks[2].record.state_reason
        devices[1].set_spec(FaultSpec(read_error=1.0, seed=1))  # one bad probe, then fine
        await probe_disks(pool, failures)
        devices[1].set_spec(FaultSpec())
        await probe_disks(pool, failures)
        assert failures == {}
        assert pool.disks[1].record.state == "online"

    trio.run(scenario)
