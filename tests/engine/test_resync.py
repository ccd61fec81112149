"""Write-intent log and resync after an unclean stop, in-process on memory disks.

A "crash" here is: writes landed on some columns and not others (or data without its
checksum), the intent log still lists the region, and the pool is reopened from the disks.
"""

import random

import pytest
import trio
import trio.testing

from blockspace.errors import FormatError, Unrecoverable
from blockspace.geometry.layouts import LayoutSpec, code_position
from blockspace.ondisk.checksums import ENTRY_SIZE
from blockspace.pool.intent import (
    MAX_ENTRIES,
    REGION_SIZE,
    V1_REGION_SIZE,
    IntentLog,
    Key,
    decode_intent,
    encode_intent,
    rescale,
    volume_key,
)
from blockspace.pool.pool import Pool
from blockspace.testing.crashsim import mount_like_daemon
from blockspace.testing.memory_device import MemoryDevice
from blockspace.volume.volume import Volume

MiB = 1 << 20
POOL_UUID = "2f1d7c8e-4a3b-4c5d-8e9f-0a1b2c3d4e5f"


async def make(spec: LayoutSpec, disks: int) -> tuple[Pool, Volume, list[MemoryDevice]]:
    devices = [MemoryDevice(12 * MiB, path=f"mem{i}") for i in range(disks)]
    pool = await Pool.create("t", devices, media=["hdd"] * disks, slab_size=MiB,
                             meta_slot_size=64 << 10)
    await pool.enable_intent_log()
    record = await pool.create_volume("v", 2 * spec.slab_data_size(MiB), spec, "thin")
    return pool, Volume(pool, record), devices


async def reopen(devices: list[MemoryDevice]) -> tuple[Pool, Volume]:
    """What the daemon does at mount after a crash."""
    pool = await Pool.open(devices)
    await pool.enable_intent_log()
    return pool, Volume(pool, pool.volume("v"))


def raw_extent(
    pool: Pool, volume: Volume, position: int, slab: int = 0
) -> tuple[MemoryDevice, int]:
    disk_id, extent = volume.record.slabs[slab][position]
    device = pool.disks[disk_id].device
    assert isinstance(device, MemoryDevice)
    return device, pool.extent_offset(disk_id, extent)


def test_intent_record_round_trip_and_rejects_torn_or_foreign_records() -> None:
    keys = {(7, 0, 1), (7, 3, 0), (2**63, 2**31, 5)}
    raw = encode_intent(42, POOL_UUID, keys)
    assert decode_intent(raw, POOL_UUID) == (42, keys, REGION_SIZE)
    torn = bytearray(raw)
    torn[-3] ^= 0xFF
    with pytest.raises(FormatError, match="checksum"):
        decode_intent(bytes(torn), POOL_UUID)
    with pytest.raises(FormatError, match="another pool"):
        decode_intent(raw, "00000000-0000-4000-8000-000000000000")
    with pytest.raises(FormatError):
        decode_intent(raw[:20], POOL_UUID)
    with pytest.raises(FormatError, match="no intent"):
        decode_intent(bytes(len(raw)), POOL_UUID)
    with pytest.raises(ValueError, match="do not fit"):
        encode_intent(1, POOL_UUID, {(1, 0, i) for i in range(MAX_ENTRIES + 1)})


def _v1_record(generation: int, pool_uuid: str, keys: set[tuple[int, int, int]]) -> bytes:
    """An intent record as version 1 wrote it (no region size: 1 MiB regions)."""
    import struct
    import uuid

    import xxhash

    entries = b"".join(struct.pack("<QII", *key) for key in sorted(keys))
    header = struct.pack("<8sIIQQ16s", b"BLKSPCWI", 1, len(keys), generation,
                         xxhash.xxh3_64_intdigest(entries), uuid.UUID(pool_uuid).bytes)
    return header + entries


def test_a_version_1_record_counts_in_1_MiB_regions() -> None:
    keys = {(7, 0, 5)}
    assert decode_intent(_v1_record(3, POOL_UUID, keys), POOL_UUID) == (3, keys, V1_REGION_SIZE)
    bad = bytearray(encode_intent(4, POOL_UUID, keys))
    bad[48:52] = (12345).to_bytes(4, "little")  # the region size: not a power of two
    with pytest.raises(FormatError, match="region size"):
        decode_intent(bytes(bad), POOL_UUID)


def test_rescale_covers_at_least_the_bytes_each_old_region_covered() -> None:
    mib = V1_REGION_SIZE
    keys = {(1, 0, 5), (1, 2, 3), (2, 0, 1), (3, 0, 9), (4, 1, 7)}
    interleaves = {1: 64 << 10, 2: 2 * mib, 3: 8 * mib}  # volume 4 was deleted
    scaled = rescale(keys, mib, interleaves)
    assert scaled == {
        (1, 0, 5 * mib // REGION_SIZE),  # 5-6 MiB lies in today's 4-8 MiB region
        (1, 2, 0),
        (2, 0, 0),  # 2 MiB regions (one stripe unit) then, 4 MiB now: 2-4 MiB in 0-4 MiB
        (3, 0, 9),  # a stripe unit larger than both: the same regions
        (4, 1, 7),  # unknown volume: kept
    }
    for volume, slab, region in keys - {(4, 1, 7)}:  # every old byte range is covered
        old = max(mib, interleaves[volume])
        new = max(REGION_SIZE, interleaves[volume])
        start, end = region * old, (region + 1) * old
        covered = {(volume, slab, r) for r in range(start // new, (end - 1) // new + 1)}
        assert covered <= scaled


def test_dirty_regions_left_by_a_version_1_record_are_resynced() -> None:
    """A pool last run by code with 1 MiB regions, stopped uncleanly: its dirty region 5
    (5-6 MiB of the extent) is resynced as today's region holding those bytes."""

    async def scenario() -> None:
        devices = [MemoryDevice(40 * MiB, path=f"mem{i}") for i in range(2)]
        pool = await Pool.create("t", devices, media=["hdd"] * 2, slab_size=8 * MiB,
                                 meta_slot_size=64 << 10)
        await pool.enable_intent_log()
        spec = LayoutSpec("mirror", 1, copies=2)
        volume = Volume(pool, await pool.create_volume("v", 8 * MiB, spec, "thin"))
        old, new = b"A" * 65536, b"B" * 65536
        at = 5 * MiB
        await volume.write(at, old)
        await volume.flush()
        await volume.write(at, new)
        device, base = raw_extent(pool, volume, 1)
        device.data[base + at : base + at + 65536] = old  # copy 1 missed the new data
        record = _v1_record(pool.intent.generation + 1, pool.uuid,
                            {(volume_key(volume.record.uuid), 0, 5)})
        for disk in pool.disks.values():
            for slot in (0, 1):
                disk.device.write_sync(disk.geometry.intent_slot_offset(slot), record)
        pool2, volume2 = await reopen(devices)
        assert volume2.pending_resync == {(0, at // REGION_SIZE)}
        await volume2.resync_pending()
        for position in (0, 1):
            device, base = raw_extent(pool2, volume2, position)
            assert bytes(device.data[base + at : base + at + 65536]) == new

    trio.run(scenario)


def test_mirror_copy_that_missed_a_write_is_made_equal_after_crash() -> None:
    async def scenario() -> None:
        pool, volume, devices = await make(LayoutSpec("mirror", 1, copies=2), disks=2)
        old, new = b"A" * 65536, b"B" * 65536
        await volume.write(0, old)
        await volume.flush()
        await volume.write(0, new)
        # Crash: copy 1 never got the new data (its checksum entry did land).
        device, base = raw_extent(pool, volume, 1)
        device.data[base : base + 65536] = old
        pool2, volume2 = await reopen(devices)
        assert volume2.pending_resync == {(0, 0)}
        assert await volume2.resync_pending() == 1
        assert volume2.pending_resync == set()
        for position in (0, 1):
            device, base = raw_extent(pool2, volume2, position)
            assert bytes(device.data[base : base + 65536]) == new
        assert await volume2.read(0, 65536) == new
        assert all(d.errors["checksum"] == 0 for d in pool2.disks.values())

    trio.run(scenario)


def test_parity_recomputed_after_torn_row_closes_the_write_hole() -> None:
    async def scenario() -> None:
        spec = LayoutSpec("parity", 3, parity=1, interleave=16384)
        pool, volume, devices = await make(spec, disks=4)
        row = spec.interleave * spec.columns
        await volume.write(0, random.randbytes(row))
        await volume.flush()
        # Crash mid read-modify-write: column 0 got new data and checksum, parity did not.
        torn = random.randbytes(spec.interleave)
        await volume.write(0, torn)
        parity_device, parity_base = raw_extent(pool, volume, code_position(spec, 0, 3))
        before = await volume.read(0, row)
        stale = bytearray(parity_device.data[parity_base : parity_base + spec.interleave])
        for i in range(len(stale)):
            stale[i] ^= 0x5A  # parity from before the write (any different bytes will do)
        parity_device.data[parity_base : parity_base + spec.interleave] = stale
        pool2, volume2 = await reopen(devices)
        assert volume2.pending_resync
        await volume2.resync_pending()
        # Lose the disk of column 1: it must be rebuilt correctly from the resynced parity.
        disk_id, _ = volume2.record.slabs[0][code_position(spec, 0, 1)]
        device = pool2.disks[disk_id].device
        assert isinstance(device, MemoryDevice)
        device.failed = True
        assert await volume2.read(0, row) == before

    trio.run(scenario)


def test_data_without_its_checksum_reads_after_resync_not_eio() -> None:
    async def scenario() -> None:
        pool, volume, devices = await make(LayoutSpec("simple", 2), disks=2)
        await volume.write(0, b"x" * 8192)
        await volume.flush()
        # Crash: new data landed, its checksum entries did not.
        device, base = raw_extent(pool, volume, 0)
        device.data[base : base + 8192] = b"y" * 8192
        pool2, volume2 = await reopen(devices)
        assert await volume2.read(0, 8192) == b"y" * 8192  # resynced on first touch
        assert volume2.pending_resync == set()

    trio.run(scenario)


def test_clean_stop_leaves_nothing_to_resync() -> None:
    async def scenario() -> None:
        pool, volume, devices = await make(LayoutSpec("mirror", 1, copies=2), disks=3)
        await volume.write(MiB // 2, b"z" * 100_000)
        assert pool.intent is not None
        assert pool.intent.durable
        await pool.close_intent_log()
        _, volume2 = await reopen(devices)
        assert volume2.pending_resync == set()

    trio.run(scenario)


def test_cleaner_clears_idle_regions_after_a_flush_but_not_busy_ones() -> None:
    async def scenario() -> None:
        pool, volume, devices = await make(LayoutSpec("mirror", 1, copies=2), disks=2)
        assert pool.intent is not None
        await volume.write(0, b"q" * 4096)
        assert len(pool.intent.durable) == 1
        flushes = sum(d.statistics().flushes for d in devices)
        await trio.sleep(1.0)
        assert await pool.intent.clean(idle=2.0) == 0  # written too recently
        await trio.sleep(2.0)
        assert await pool.intent.clean(idle=2.0) == 1
        assert pool.intent.durable == set()
        assert sum(d.statistics().flushes for d in devices) > flushes  # flushed before clearing
        _, volume2 = await reopen(devices)
        assert volume2.pending_resync == set()

    trio.run(scenario, clock=trio.testing.MockClock(autojump_threshold=0))


def test_checksum_entry_layout_is_16_bytes() -> None:
    assert ENTRY_SIZE == 16


def test_a_write_that_starts_while_its_region_is_being_cleared_waits_and_re_marks_it() -> None:
    """Clearing records a set without the region; a write that begins while that record is
    on its way to the disks must not trust the old in-memory set, or it would run in a
    region the disks call clean and a crash mid-write would go unresynced."""
    async def scenario() -> None:
        records: list[set[Key]] = []
        gate = trio.Event()

        async def persist(generation: int, keys: set[Key]) -> None:
            records.append(set(keys))
            if len(records) == 1:
                await gate.wait()  # the clearing record is slow to reach the disks

        async def flush() -> None:
            await trio.lowlevel.checkpoint()

        key: Key = (1, 0, 0)
        log = IntentLog(persist, flush, generation=1, durable={key})
        began = trio.Event()

        async def write() -> None:
            await log.begin({key})
            began.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(log.clean, 0.0)
            await trio.testing.wait_all_tasks_blocked()
            assert records == [set()]  # the clearing record is being written
            nursery.start_soon(write)
            await trio.testing.wait_all_tasks_blocked()
            assert not began.is_set()  # does not run on the strength of the old set
            gate.set()
        assert began.is_set()
        assert records == [set(), {key}]  # re-marked dirty before the write went ahead
        assert log.durable == {key}
        log.end({key})

    trio.run(scenario)


def test_a_zeroed_column_in_a_dirty_region_is_rebuilt_not_taken_into_parity() -> None:
    """Issue 17 item 3: a region resync never recomputes parity from a column it cannot
    verify. A column zeroed (data and checksums) reads as "never written" and verifies on
    its own; its row says otherwise, so it is rebuilt from the others instead of the
    parity being recomputed from its zeros."""
    async def scenario() -> None:
        spec = LayoutSpec("parity", 2, parity=1, interleave=16384)
        pool, volume, devices = await make(spec, disks=3)
        data = random.randbytes(volume.slab_data_size)
        await volume.write(0, data)
        await volume.flush()  # no clean stop: the intent log keeps slab 0's regions dirty
        device, base = raw_extent(pool, volume, 0)
        stride = pool.disks[volume.record.slabs[0][0][0]].geometry.extent_stride
        device.data[base : base + stride] = bytes(stride)
        pool2, volume2 = await reopen(devices)
        assert volume2.pending_resync
        await volume2.resync_pending()
        assert await volume2.read(0, len(data)) == data

    trio.run(scenario)


@pytest.mark.parametrize("unlanded", [(0, 2, 3), (0, 2)], ids=["parity-entry", "stamps-only"])
def test_a_torn_first_write_of_a_row_resyncs_to_a_row_every_disk_loss_can_read(
    unlanded: tuple[int, ...],
) -> None:
    """A row's first write, torn by a power cut (tests/engine/test_crash.py, parity-1 cut
    after op 168): the written column's data and entry landed, and not the stamps of the
    columns the write did not touch, which still say "never written"; the parity's data
    landed, with or without its entry. Nothing in the row is damage. The resync must
    settle it (old or new data) and leave no fragment looking behind its row, or a read
    with a disk out refuses the row: EIO on blocks nobody acknowledged a change to."""
    async def scenario() -> None:
        spec = LayoutSpec("parity", 3, parity=1, interleave=8192)
        pool, volume, devices = await make(spec, disks=4)
        new = random.randbytes(4096)
        await volume.write(spec.interleave, new)  # row 0, column 1, its first block
        await volume.flush()  # no clean stop: the region stays dirty
        for index in unlanded:  # entries that never landed
            disk_id, extent = volume.record.slabs[0][code_position(spec, 0, index)]
            device = pool.disks[disk_id].device
            assert isinstance(device, MemoryDevice)
            at = pool.checksum_offset(disk_id, extent)
            device.data[at : at + ENTRY_SIZE] = bytes(ENTRY_SIZE)
        row = spec.interleave * spec.columns

        pool2, volume2 = await reopen(devices)
        assert volume2.pending_resync
        await volume2.resync_pending()
        await pool2.close_intent_log()  # a clean stop, then a disk lost
        # (The disks as the resync left them: a read would heal what it judges.)
        images = [bytes(device.data) for device in devices]
        seen = await volume2.read(0, row)
        assert seen[spec.interleave : spec.interleave + 4096] in (new, bytes(4096))
        assert seen[: spec.interleave] == bytes(spec.interleave)
        assert seen[spec.interleave + 4096 :] == bytes(row - spec.interleave - 4096)
        for lost in range(len(devices)):
            present = []  # copies: the mount records the absent disk on the others
            for i, image in enumerate(images):
                if i != lost:
                    present.append(MemoryDevice(len(image), path=f"mem{i}"))
                    present[-1].data[:] = image
            pool3, volume3 = await mount_like_daemon(present, "v")
            try:
                assert await volume3.read(0, row) == seen, f"disk {lost} out"
            finally:
                pool3.close()

    trio.run(scenario)


def test_a_torn_write_met_with_a_disk_out_still_serves_the_columns_it_did_not_touch() -> None:
    """A power cut tears a write (column 0's data landed, the parity's did not) and the
    pool comes back with another disk missing: the row cannot be resynced (its missing
    column depends on the parity) and has no spare fragment to check anything by. Column
    1, written long before and acknowledged, verifies and claims nothing against its row
    (it is older than parity, as a column the newest writes did not touch is): it is
    served as it is. Column 2, the missing one, would be rebuilt from the parity that
    missed the write: refused (EIO), never served as garbage."""
    async def scenario() -> None:
        spec = LayoutSpec("parity", 3, parity=1, interleave=8192)
        pool, volume, devices = await make(spec, disks=4)
        unit = spec.interleave

        def area(index: int, entries: bool) -> tuple[MemoryDevice, int, int]:
            disk_id, extent = volume.record.slabs[0][code_position(spec, 0, index)]
            device = pool.disks[disk_id].device
            assert isinstance(device, MemoryDevice)
            if entries:
                return device, pool.checksum_offset(disk_id, extent), 2 * ENTRY_SIZE
            return device, pool.extent_offset(disk_id, extent), unit

        def save(index: int, entries: bool) -> bytes:
            device, at, size = area(index, entries)
            return bytes(device.data[at : at + size])

        def put(index: int, entries: bool, old: bytes) -> None:
            device, at, size = area(index, entries)
            device.data[at : at + size] = old

        first = random.randbytes(3 * unit)
        await volume.write(0, first)  # the whole row, acknowledged
        column_1 = save(1, entries=True)  # its entries before a later write stamped them
        await volume.write(0, random.randbytes(unit))  # column 0 again, acknowledged
        await volume.flush()
        parity = save(3, entries=False), save(3, entries=True)
        await volume.write(0, random.randbytes(unit))  # torn: the parity keeps its old state
        await volume.flush()
        put(3, False, parity[0])
        put(3, True, parity[1])
        put(1, True, column_1)  # as a pool whose reads never stamped column 1 has it
        lost = pool.disks[volume.record.slabs[0][code_position(spec, 0, 2)][0]]
        present = [d for d in devices if d is not lost.device]
        pool2, volume2 = await mount_like_daemon(present, "v")
        await volume2.resync_pending()
        assert await volume2.read(unit, unit) == first[unit : 2 * unit]
        with pytest.raises(Unrecoverable):
            await volume2.read(2 * unit, unit)
        pool2.close()

    trio.run(scenario)


def test_a_dirty_row_is_never_rebuilt_from_parity_that_assumed_a_version_never_landed() -> None:
    """Two unacknowledged writes in one row, torn (test_crash.py parity-1 seed 7): column
    0's new data never landed but the parity computed with it did, and column 1's new data
    landed without its entry (it fails its checksum). Rebuilding column 1 from column 0 and
    that parity gives bytes no write ever held; the resync must instead keep each column a
    version some write put there, and recompute parity from them."""
    async def scenario() -> None:
        spec = LayoutSpec("parity", 3, parity=1, interleave=8192)
        pool, volume, devices = await make(spec, disks=4)
        unit = spec.interleave

        def area(index: int, entries: bool) -> tuple[MemoryDevice, int, int]:
            disk_id, extent = volume.record.slabs[0][code_position(spec, 0, index)]
            device = pool.disks[disk_id].device
            assert isinstance(device, MemoryDevice)
            if entries:
                return device, pool.checksum_offset(disk_id, extent), 2 * ENTRY_SIZE
            return device, pool.extent_offset(disk_id, extent), unit

        def save(index: int, entries: bool) -> bytes:
            device, at, size = area(index, entries)
            return bytes(device.data[at : at + size])

        def put(index: int, entries: bool, old: bytes) -> None:
            device, at, size = area(index, entries)
            device.data[at : at + size] = old

        first = random.randbytes(3 * unit)
        await volume.write(0, first)
        await volume.flush()
        column_0 = save(0, entries=False), save(0, entries=True)
        column_1_entries = save(1, entries=True)
        new_0, new_1 = random.randbytes(unit), random.randbytes(unit)
        await volume.write(0, new_0)
        await volume.write(unit, new_1)
        await volume.flush()
        put(0, False, column_0[0])  # column 0's write never landed (its parity did)
        put(0, True, column_0[1])
        put(1, True, column_1_entries)  # column 1's data landed, its entry did not

        pool2, volume2 = await reopen(devices)
        await volume2.resync_pending()
        seen = await volume2.read(0, 3 * unit)
        assert seen[:unit] in (first[:unit], new_0)
        assert seen[unit : 2 * unit] in (first[unit : 2 * unit], new_1)
        assert seen[2 * unit :] == first[2 * unit :]

    trio.run(scenario)
