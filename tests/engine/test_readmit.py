"""A disk that comes back after failing is re-admitted and caught up by what it missed."""

import random

import pytest
import trio

from blockspace.errors import InvalidInput, Unrecoverable
from blockspace.geometry.layouts import LayoutSpec
from blockspace.pool.pool import Pool
from blockspace.repair.readmit import catch_up_disk, fresh_extents, prepare
from blockspace.repair.rebuild import RebuildProgress
from blockspace.repair.scrub import scrub_slab
from blockspace.testing.memory_device import MemoryDevice
from blockspace.volume.parity import rows_written_since
from blockspace.volume.volume import Volume

MiB = 1 << 20
MIRROR = LayoutSpec("mirror", 1, copies=2, interleave=16384)
PARITY = LayoutSpec("parity", 2, parity=1, interleave=16384)
SLABS = 6


async def make(spec: LayoutSpec) -> tuple[Pool, Volume, list[MemoryDevice], bytearray]:
    devices = [MemoryDevice(16 * MiB, path=f"mem{i}") for i in range(spec.width)]
    pool = await Pool.create("r", devices, media=["hdd"] * spec.width, slab_size=MiB,
                             meta_slot_size=64 << 10)
    record = await pool.create_volume("v", SLABS * spec.slab_data_size(MiB), spec, "thin")
    volume = Volume(pool, record)
    model = bytearray(volume.size)
    first = random.Random(1).randbytes(2 * spec.slab_data_size(MiB))  # slabs 0 and 1
    await volume.write(0, first)
    model[: len(first)] = first
    return pool, volume, devices, model


async def write(volume: Volume, model: bytearray, offset: int, length: int, seed: int) -> None:
    data = random.Random(seed).randbytes(length)
    await volume.write(offset, data)
    model[offset : offset + length] = data


async def check_whole(pool: Pool, volume: Volume, model: bytearray) -> None:
    for slab in volume.record.slabs:
        report = await scrub_slab(volume, slab, repair=False)
        assert (report.mismatches, report.checksum_errors) == (0, 0), slab
    assert await volume.read(0, volume.size) == bytes(model)


@pytest.mark.parametrize("spec", [MIRROR, PARITY], ids=["mirror-2", "parity-1"])
def test_a_returning_disk_is_caught_up_by_what_it_missed(spec: LayoutSpec) -> None:
    async def scenario() -> None:
        pool, volume, devices, model = await make(spec)
        devices[1].failed = True
        await pool.mark_failed(1, "test: cable pulled")
        slab_data = spec.slab_data_size(MiB)
        await write(volume, model, 4096, 64 << 10, seed=2)  # slab 0: a few rows change
        await write(volume, model, 3 * slab_data, slab_data, seed=3)  # slab 3: new, degraded
        assert await volume.read(0, volume.size) == bytes(model)
        devices[1].failed = False  # it is back, with what it had when it left
        pending = await prepare(pool, 1, devices[1])
        assert pending == 3
        assert pool.disks[1].record.state == "resyncing"
        progress = RebuildProgress(state="running")
        await catch_up_disk(pool, {"v": volume}, 1, progress)
        record = pool.disks[1].record
        assert (record.state, record.missed_since) == ("online", 0)
        assert pool.resyncing == set()
        assert progress.done == 3
        # Only what changed was rewritten: slab 0's few rows and the new slab, not slab 1.
        assert 0 < progress.bytes_moved <= 2 * MiB
        await check_whole(pool, volume, model)
        # The other disk may go now: the returned disk carries everything.
        devices[0].failed = True
        await pool.mark_failed(0, "test")
        assert await volume.read(0, volume.size) == bytes(model)
        reopened = await Pool.open(devices[1:])
        assert reopened.disks[1].record.state == "online"

    trio.run(scenario)


@pytest.mark.parametrize("spec", [MIRROR, PARITY], ids=["mirror-2", "parity-1"])
def test_writes_during_the_catch_up_and_a_restart_in_the_middle_lose_nothing(
    spec: LayoutSpec,
) -> None:
    async def scenario() -> None:
        pool, volume, devices, model = await make(spec)
        devices[1].failed = True
        await pool.mark_failed(1, "test")
        await write(volume, model, 8192, 1 << 20, seed=4)
        devices[1].failed = False
        await prepare(pool, 1, devices[1])
        # A restart right here: the disk is "resyncing" and none of it is trusted yet.
        pool = await Pool.open(devices)
        volume = Volume(pool, pool.volume("v"))
        assert pool.disks[1].record.state == "resyncing"
        assert pool.resyncing == set(pool.extents_of(1))
        assert await volume.read(0, volume.size) == bytes(model)
        for device in devices:
            device.delay = 0.0002
        rng = random.Random(5)

        async def writer() -> None:
            for _ in range(40):
                offset = rng.randrange(0, volume.size // 4096 - 16) * 4096
                await write(volume, model, offset, rng.choice([4096, 65536]), rng.random())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer)
            nursery.start_soon(catch_up_disk, pool, {"v": volume}, 1,
                               RebuildProgress(state="running"))
        assert pool.disks[1].record.state == "online"
        for device in devices:
            device.delay = 0.0
        await check_whole(pool, volume, model)

    trio.run(scenario)


@pytest.mark.parametrize("spec", [MIRROR, PARITY], ids=["mirror-2", "parity-1"])
def test_the_write_that_finds_the_disk_dead_is_caught_up_too(spec: LayoutSpec) -> None:
    """The disk is failed by the write that hits it, so that write is the oldest in flight
    and its number is the disk's `missed_since` (found as zeros in the scenario suite:
    parity rows whose only write carried exactly that number were trusted as they were)."""

    async def scenario() -> None:
        pool, volume, devices, model = await make(spec)
        devices[1].failed = True  # not marked: the next write finds out
        await write(volume, model, 0, 256 << 10, seed=8)
        record = pool.disks[1].record
        assert record.state == "failed"
        assert record.missed_since > 0
        devices[1].failed = False
        await prepare(pool, 1, devices[1])
        await catch_up_disk(pool, {"v": volume}, 1, RebuildProgress(state="running"))
        assert pool.disks[1].record.state == "online"
        for other in range(spec.width):  # any one other disk may go now
            if other == 1:
                continue
            devices[other].failed = True
            assert await volume.read(0, 256 << 10) == bytes(model[: 256 << 10]), other
            devices[other].failed = False

    trio.run(scenario)


def test_only_a_failed_or_missing_disk_with_its_own_label_comes_back() -> None:
    async def scenario() -> None:
        pool, _, devices, _ = await make(MIRROR)
        with pytest.raises(InvalidInput, match="only a failed or missing disk"):
            await prepare(pool, 1, devices[1])
        devices[1].failed = True
        await pool.mark_failed(1, "test")
        generation = pool.metadata.generation
        stranger = MemoryDevice(16 * MiB, path="stranger")
        with pytest.raises(InvalidInput, match="label does not match"):
            await prepare(pool, 1, stranger)
        with pytest.raises(InvalidInput, match="label does not match"):
            await prepare(pool, 1, devices[0])  # another member of the pool
        assert pool.disks[1].record.state == "failed"
        assert pool.metadata.generation == generation

    trio.run(scenario)


def test_fresh_extents_are_those_the_disk_did_not_hold_when_it_left() -> None:
    async def scenario() -> None:
        pool, volume, devices, _ = await make(MIRROR)
        import copy

        before = copy.deepcopy(pool.metadata)
        devices[1].failed = True
        await pool.mark_failed(1, "test")
        await volume.write(4 * MiB, b"x" * 4096)  # slab 4: placed degraded on disk 1
        fresh = fresh_extents(pool.metadata, before, 1)
        assert fresh == {volume.record.slabs[4][1]}
        assert fresh_extents(pool.metadata, None, 1) == set(pool.extents_of(1))

    trio.run(scenario)


def test_rows_written_since_looks_at_the_other_columns_only() -> None:
    old, new = (5).to_bytes(8, "little"), (50).to_bytes(8, "little")
    entry_old, entry_new = b"\1" * 8 + old, b"\1" * 8 + new
    entries = {0: entry_old * 4, 1: entry_old * 2 + entry_new * 2, 2: entry_new * 4}
    assert rows_written_since(entries, 2, range(2), 2, since=10) == [1]
    assert rows_written_since(entries, 1, range(2), 2, since=10) == [0, 1]
    assert rows_written_since(entries, 0, range(2), 2, since=100) == []
    # `since` is the oldest write in flight when the disk left: that write was missed too.
    assert rows_written_since(entries, 2, range(2), 2, since=50) == [1]


def test_disks_lost_beyond_the_tolerance_come_back_last_out_first() -> None:
    """Mirror-2 on three disks: one copy of slab 0 dies, a write lands on the other alone,
    then that one dies too. Both come back: the last out must be first (it has the
    write), and the first out alone is refused."""
    from blockspace.repair.readmit import check_return_order, returning_order

    async def scenario() -> None:
        devices = [MemoryDevice(16 * MiB, path=f"mem{i}") for i in range(3)]
        pool = await Pool.create("r", devices, media=["hdd"] * 3, slab_size=MiB,
                                 meta_slot_size=64 << 10)
        volume = Volume(pool, await pool.create_volume("v", 4 * MiB, MIRROR, "thin"))
        model = bytearray(volume.size)
        await write(volume, model, 0, volume.size, seed=6)
        (last, _), (first, _) = volume.record.slabs[0]
        devices[first].failed = True
        await pool.mark_failed(first, "test: first")
        await write(volume, model, 0, 256 << 10, seed=7)  # slab 0: on `last` alone
        devices[last].failed = True
        await pool.mark_failed(last, "test: second")
        for device in devices:
            device.failed = False
        with pytest.raises(InvalidInput, match=f"disk {last} left after disk {first}"):
            check_return_order(pool, [first])
        check_return_order(pool, [first, last])
        order = returning_order(pool, [first, last])
        assert order == [last, first]
        for disk_id in order:
            await prepare(pool, disk_id, devices[disk_id])
        for disk_id in order:
            await catch_up_disk(pool, {"v": volume}, disk_id, RebuildProgress())
        assert {d.record.state for d in pool.disks.values()} == {"online"}
        await check_whole(pool, volume, model)

    trio.run(scenario)


def test_a_torn_write_beyond_the_tolerance_does_not_poison_the_returning_columns() -> None:
    """Parity 2+1, two of a slab's three disks die at once; a full-row write then lands on
    the survivor only (it fails: never acknowledged). When both come back, the row must not
    be rebuilt from the survivor's torn column: the returning column reads back either the
    old or the new data, never a mix of the two (seen as zeros in the scenario suite)."""
    from blockspace.repair.readmit import catch_up_disks, returning_order

    async def scenario() -> None:
        devices = [MemoryDevice(16 * MiB, path=f"mem{i}") for i in range(4)]
        pool = await Pool.create("t", devices, media=["hdd"] * 4, slab_size=MiB,
                                 meta_slot_size=64 << 10)
        volume = Volume(pool, await pool.create_volume("v", 4 * MiB, PARITY, "thin"))
        row = PARITY.interleave * PARITY.columns
        old = random.Random(1).randbytes(2 * row)
        await volume.write(0, old)
        extents = volume.record.slabs[0]
        dead = [extents[1][0], extents[2][0]]  # row 0: column 1 and the parity
        for disk_id in dead:
            devices[disk_id].failed = True
            await pool.mark_failed(disk_id, "test")
        new = random.Random(2).randbytes(row)
        with pytest.raises(Unrecoverable):
            await volume.write(0, new)  # column 0 lands on the survivor, the rest fails
        for disk_id in dead:
            devices[disk_id].failed = False
        order = returning_order(pool, dead)
        for disk_id in order:
            await prepare(pool, disk_id, devices[disk_id])
        await catch_up_disks(pool, {"v": volume}, order, RebuildProgress())
        half = PARITY.interleave
        got = await volume.read(0, row)
        assert got[:half] in (old[:half], new[:half])
        assert got[half:row] in (old[half:row], new[half:row])  # column 1: not rebuilt garbage
        assert await volume.read(row, row) == old[row:]

    trio.run(scenario)


def test_the_catch_up_never_rebuilds_from_a_zeroed_column() -> None:
    """Issue 17 item 3: a returning disk's rows are rebuilt only from columns that verify
    against their row. A stayer whose extent was zeroed (data and checksums: "never
    written", which verifies on its own) is found out by the row's other columns and left
    out of the rebuild, and fixed itself by the scrub after."""
    spec = LayoutSpec("parity", 2, parity=2, interleave=16384)

    async def scenario() -> None:
        pool, volume, devices, model = await make(spec)
        devices[1].failed = True
        await pool.mark_failed(1, "test: cable pulled")
        await write(volume, model, 0, 8 * spec.interleave * spec.columns, seed=4)
        disk_id, extent = next(e for e in volume.record.slabs[0] if e[0] != 1)
        base = pool.extent_offset(disk_id, extent)
        stride = pool.disks[disk_id].geometry.extent_stride
        devices[disk_id].data[base : base + stride] = bytes(stride)
        pool.checksums.forget_disk(disk_id)  # as after a remount: entries from the disk
        devices[1].failed = False
        await prepare(pool, 1, devices[1])
        await catch_up_disk(pool, {"v": volume}, 1, RebuildProgress(state="running"))
        assert pool.disks[1].record.state == "online"
        # The returned disk was rebuilt right: with the zeroed disk gone, all still reads.
        devices[disk_id].failed = True
        await pool.mark_failed(disk_id, "test")
        assert await volume.read(0, volume.size) == bytes(model)

    trio.run(scenario)
