"""Ordering and timeout guarantees that only show in the order of device operations or in
the slot a metadata generation lands in (issue 21, rows 4-7).

Counting flushes is not enough for these: a flush that comes after the record it was meant
to precede satisfies a count. So every disk here sits behind a `Recorder`, which logs each
zero, write and flush (when it starts and when it completes) into one log shared by all disks
of the pool, and the tests check the order of that log.
"""

import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
import trio.testing

from blockspace.disks.devices import Buffer, Device, byte_view, open_device
from blockspace.disks.faults import FaultSpec, FaultyDevice
from blockspace.errors import DeviceError, FormatError
from blockspace.geometry.layouts import LayoutSpec, data_positions
from blockspace.ondisk.journal import RECORD_HEADER_SIZE, index_slot, mapped_in_write
from blockspace.ondisk.label import DiskGeometry
from blockspace.ondisk.metadata import PoolMetadata
from blockspace.pool.intent import INTENT_SLOT_SIZE, Key, decode_intent, volume_key
from blockspace.pool.pool import Pool
from blockspace.testing.memory_device import MemoryDevice
from blockspace.volume.volume import Volume

MiB = 1 << 20
META_SLOT = 64 << 10
MIRROR = LayoutSpec("mirror", 1, copies=2, interleave=16384)


# --------------------------------------------------------------------------------------------
# the recorder


@dataclass(frozen=True)
class Op:
    """One device operation as the recorder saw it: `phase` is "start" (called) or "done"
    (returned without error); `data` is kept for writes, to decode metadata and intent
    records."""

    disk: str
    kind: str  # "read" (start only) | "zero" | "write" | "flush"
    phase: str
    offset: int = 0
    length: int = 0
    data: bytes = b""


class Recorder(Device):
    """Forwards everything to `inner` and appends every async read and every zero, write
    and flush to `log`.
    It offers no fast paths (no read_now, no io_uring chains, write_many piece by piece),
    so every write of the product code passes through `write` and is seen."""

    def __init__(self, inner: Device, log: list[Op]) -> None:
        super().__init__(inner.path, inner.size)
        self.inner = inner
        self.log = log
        self.recording = True

    def _note(self, kind: str, phase: str, offset: int = 0, length: int = 0,
              data: bytes = b"") -> None:
        if self.recording:
            self.log.append(Op(self.path, kind, phase, offset, length, data))

    async def read(self, offset: int, length: int) -> bytes:
        self._note("read", "start", offset, length)
        return await self.inner.read(offset, length)

    async def write(self, offset: int, data: Buffer) -> None:
        raw = bytes(byte_view(data))
        self._note("write", "start", offset, len(raw), raw)
        await self.inner.write(offset, data)
        self._note("write", "done", offset, len(raw), raw)

    async def flush(self) -> None:
        self._note("flush", "start")
        await self.inner.flush()
        self._note("flush", "done")

    async def zero(self, offset: int, length: int) -> None:
        self._note("zero", "start", offset, length)
        await self.inner.zero(offset, length)
        self._note("zero", "done", offset, length)

    def read_sync(self, offset: int, length: int) -> bytes:
        return self.inner.read_sync(offset, length)

    def write_sync(self, offset: int, data: Buffer) -> None:
        raw = bytes(byte_view(data))
        self._note("write", "start", offset, len(raw), raw)
        self.inner.write_sync(offset, data)
        self._note("write", "done", offset, len(raw), raw)

    def flush_sync(self) -> None:
        self._note("flush", "start")
        self.inner.flush_sync()
        self._note("flush", "done")

    def zero_sync(self, offset: int, length: int) -> None:
        self._note("zero", "start", offset, length)
        self.inner.zero_sync(offset, length)
        self._note("zero", "done", offset, length)

    def close(self) -> None:
        self._closed = True
        self.inner.close()


def recorded_disks(count: int, log: list[Op]) -> list[Recorder]:
    return [Recorder(MemoryDevice(12 * MiB, path=f"mem{i}"), log) for i in range(count)]


def geometry_of(pool: Pool, path: str) -> DiskGeometry:
    (disk,) = [d for d in pool.disks.values() if d.path == path]
    return disk.geometry


def in_metadata_slots(geometry: DiskGeometry, op: Op) -> bool:
    return geometry.meta_offset <= op.offset < geometry.meta_offset + 2 * geometry.meta_slot_size


def in_intent_slots(geometry: DiskGeometry, op: Op) -> bool:
    first = geometry.intent_slot_offset(0)
    return first <= op.offset < first + 2 * INTENT_SLOT_SIZE


def in_data_area(geometry: DiskGeometry, op: Op) -> bool:
    return op.offset >= geometry.data_start


# --------------------------------------------------------------------------------------------
# row 4: a new extent's zeroes are durable before any map points at it


def check_zeroed_and_flushed_before_mapped(
    pool: Pool, log: list[Op], volume_name: str, slabs: list[int]
) -> int:
    """For every extent of the new `slabs`: its zeroing completed on its disk, then a flush
    of that disk started and completed, and only then did the first metadata write (on any
    disk) of a generation that maps the extent start. Returns the extents checked."""
    volume = pool.volume(volume_name)
    # index in the log of the first metadata write mapping each extent
    first_mapping: dict[tuple[int, int], int] = {}
    for index, op in enumerate(log):
        if op.kind != "write" or op.phase != "start":
            continue
        if not in_metadata_slots(geometry_of(pool, op.disk), op):
            continue
        written = mapped_in_write(op.data, pool.uuid, META_SLOT).get(volume_name, {})
        for slab in slabs:
            for mapped_disk, mapped_extent in written.get(slab, []):
                first_mapping.setdefault((mapped_disk, mapped_extent), index)
    checked = 0
    for slab in slabs:
        for disk_id, extent in volume.slabs[slab]:
            disk = pool.disks[disk_id]
            offset = pool.extent_offset(disk_id, extent)
            mapped = first_mapping.get((disk_id, extent))
            assert mapped is not None, f"no metadata write maps extent {(disk_id, extent)}"
            zeroed = [
                i for i, op in enumerate(log[:mapped])
                if op.disk == disk.path and op.kind == "zero" and op.phase == "done"
                and op.offset <= offset
                and offset + disk.geometry.extent_stride <= op.offset + op.length
            ]
            assert zeroed, f"extent {(disk_id, extent)} mapped at log[{mapped}] unzeroed"
            flushed_after = [
                i for i, op in enumerate(log[zeroed[-1] : mapped], start=zeroed[-1])
                if op.disk == disk.path and op.kind == "flush" and op.phase == "start"
            ]
            done = [
                i for i in flushed_after
                if any(op.disk == disk.path and op.kind == "flush" and op.phase == "done"
                       for op in log[i:mapped])
            ]
            assert done, (
                f"extent {(disk_id, extent)}: zeroed at log[{zeroed[-1]}] but no flush of "
                f"{disk.path} completed before the metadata write at log[{mapped}] mapped it"
            )
            checked += 1
    return checked


def test_fixed_volume_extents_are_zeroed_and_flushed_before_the_map_that_maps_them() -> None:
    async def scenario() -> None:
        log: list[Op] = []
        devices = recorded_disks(3, log)
        pool = await Pool.create("z", devices, media=["hdd"] * 3, slab_size=MiB,
                                 meta_slot_size=META_SLOT)
        log.clear()
        await pool.create_volume("v", 3 * MiB, MIRROR, "fixed")
        assert check_zeroed_and_flushed_before_mapped(pool, log, "v", [0, 1, 2]) == 6

    trio.run(scenario)


def test_a_thin_slab_placed_by_a_write_is_zeroed_and_flushed_before_it_is_mapped() -> None:
    async def scenario() -> None:
        log: list[Op] = []
        devices = recorded_disks(3, log)
        pool = await Pool.create("z", devices, media=["hdd"] * 3, slab_size=MiB,
                                 meta_slot_size=META_SLOT)
        record = await pool.create_volume("v", 4 * MiB, MIRROR, "thin")
        volume = Volume(pool, record)
        log.clear()
        await volume.write(MiB + 8192, b"w" * 4096)  # places slab 1 only
        assert sorted(record.slabs) == [1]
        assert check_zeroed_and_flushed_before_mapped(pool, log, "v", [1]) == 2

    trio.run(scenario)


# --------------------------------------------------------------------------------------------
# row 5: the intent cleaner makes the data durable before it records the region clean


def test_the_intent_cleaner_flushes_the_data_before_it_writes_the_clearing_record() -> None:
    """Per disk the log must read: data write done -> flush started and done -> (on any
    disk) the intent record that no longer lists the region. The record's own flush comes
    after the record, so it cannot stand in for the data flush."""

    async def scenario() -> None:
        log: list[Op] = []
        devices = recorded_disks(3, log)
        pool = await Pool.create("c", devices, media=["hdd"] * 3, slab_size=MiB,
                                 meta_slot_size=META_SLOT)
        await pool.enable_intent_log()
        record = await pool.create_volume("v", 2 * MiB, MIRROR, "thin")
        volume = Volume(pool, record)
        intent = pool.intent
        assert intent is not None
        await volume.write(0, b"d" * 8192)  # the first write also places slab 0
        key: Key = (volume_key(record.uuid), 0, 0)
        assert intent.durable == {key}
        log.clear()
        await volume.write(4096, b"e" * 4096)  # the region is already dirty: no record
        assert await intent.clean(idle=0.0) == 1
        assert intent.durable == set()

        clearing = None
        for index, op in enumerate(log):
            if op.kind == "write" and op.phase == "start" and in_intent_slots(
                geometry_of(pool, op.disk), op
            ):
                _, keys, _ = decode_intent(op.data, pool.uuid)
                assert key not in keys
                clearing = index
                break
        assert clearing is not None, "the cleaner wrote no intent record"
        data_disks = {pool.disks[d].path for d, _ in record.slabs[0]}
        for path in data_disks:
            geometry = geometry_of(pool, path)
            writes = [i for i, op in enumerate(log) if op.disk == path and op.kind == "write"
                      and op.phase == "done" and in_data_area(geometry, op)]
            assert writes, f"{path}: no data write recorded"
            assert writes[-1] < clearing, f"{path}: data written after the clearing record"
            flushed = [
                i for i in range(writes[-1] + 1, clearing)
                if log[i].disk == path and log[i].kind == "flush" and log[i].phase == "start"
                and any(op.disk == path and op.kind == "flush" and op.phase == "done"
                        for op in log[i + 1 : clearing])
            ]
            assert flushed, (
                f"{path}: data written at log[{writes[-1]}], but no flush of that disk "
                f"completed before the clearing record at log[{clearing}]"
            )

    trio.run(scenario, clock=trio.testing.MockClock(autojump_threshold=0))


# --------------------------------------------------------------------------------------------
# row 6: generation g goes to slot g % 2; a bad slot g % 2 everywhere leaves g - 1


def image_files(directory: Path, count: int, size: int = 12 * MiB) -> list[Path]:
    paths = []
    for i in range(count):
        path = directory / f"d{i}.img"
        path.write_bytes(b"")
        os.truncate(path, size)
        paths.append(path)
    return paths


def slot_generations(pool: Pool) -> list[tuple[int | None, int | None]]:
    """(newest generation in slot 0, in slot 1) of every disk: its checkpoint and the
    journal records after it; None where a slot's checkpoint does not verify."""
    found = []
    for disk in pool.disks.values():
        assert disk.device is not None
        pair: list[int | None] = []
        for slot in (0, 1):
            raw = disk.device.read_sync(disk.geometry.meta_slot_offset(slot), META_SLOT)
            try:
                pair.append(index_slot(lambda o, n, r=raw: r[o : o + n], META_SLOT,
                                       pool.uuid).generation)
            except FormatError:
                pair.append(None)
        found.append((pair[0], pair[1]))
    return found


def damage(path: Path, offset: int, how: str, before: bytes) -> None:
    """Flip bytes in the middle of the payload of the record or checkpoint at `offset` of
    an image file, or tear it: its first sector new, then the bytes held before (a write cut
    short)."""
    with open(path, "r+b") as f:
        f.seek(offset)
        written = f.read(len(before))
        block = bytearray(written)
        payload = int.from_bytes(block[32:40] if block[:8] == b"BLKSPCJR" else block[24:32],
                                 "little")  # header: u64 payload length
        assert payload > 16
        middle = RECORD_HEADER_SIZE + payload // 2
        if how == "flip":
            for i in range(middle, middle + 4):
                block[i] ^= 0xFF
        else:
            block[512:] = before[512:]
        assert block != bytearray(written), "the last commit did not write here"
        f.seek(offset)
        f.write(block)


def test_commits_append_to_the_active_slot_and_checkpoints_alternate(tmp_path: Path) -> None:
    """Format 2: each commit appends a record to the journal of the active slot, the other
    slot keeps the previous checkpoint; a full journal is checkpointed into the other slot,
    so the previous state stays whole until the new checkpoint is on every disk."""
    paths = image_files(tmp_path, 3)

    async def scenario() -> None:
        pool = await Pool.create("ab", [open_device(str(p)) for p in paths], media=["hdd"] * 3,
                                 slab_size=MiB, meta_slot_size=META_SLOT)
        try:
            assert slot_generations(pool) == [(0, 0)] * 3
            for n in range(1, 5):
                await pool.create_volume(f"v{n}", MiB, MIRROR, "thin")
                assert pool.metadata.generation == n
                assert slot_generations(pool) == [(n, 0)] * 3
            for slot in (1, 0):
                for _ in range(64):  # a 64 KiB slot's journal holds far fewer records
                    if pool.journal.slot == slot:
                        break
                    await pool.commit()
                assert pool.journal.slot == slot, "no checkpoint went to the other slot"
                g = pool.metadata.generation
                assert pool.journal.base == g  # a checkpoint of generation g
                expected = (g - 1, g) if slot == 1 else (g, g - 1)
                assert slot_generations(pool) == [expected] * 3
        finally:
            pool.close()

    trio.run(scenario)


def test_every_metadata_write_is_flushed_before_its_commit_returns() -> None:
    """Each record and checkpoint a commit writes is followed, on the same disk, by a
    completed flush before the commit returns (a write in the disk's cache is not a
    commit: a power cut would take it)."""

    async def scenario() -> None:
        log: list[Op] = []
        devices = recorded_disks(3, log)
        pool = await Pool.create("fl", devices, media=["hdd"] * 3, slab_size=MiB,
                                 meta_slot_size=META_SLOT)
        for n in range(40):  # records, and checkpoints when the journal fills
            log.clear()
            await pool.create_volume(f"v{n}", MiB, MIRROR, "thin")
            for device in devices:
                geometry = geometry_of(pool, device.path)
                mine = [(i, op) for i, op in enumerate(log) if op.disk == device.path]
                writes = [i for i, op in mine if op.kind == "write" and op.phase == "done"
                          and in_metadata_slots(geometry, op)]
                assert writes, f"commit {n} wrote no metadata to {device.path}"
                flushed = [i for i, op in mine if op.kind == "flush" and op.phase == "done"]
                late = f"commit {n}: {device.path}'s metadata write not flushed before it returned"
                assert flushed, late
                assert flushed[-1] > writes[-1], late
        pool.close()

    trio.run(scenario)


@pytest.mark.parametrize("what", ["record", "checkpoint"])
@pytest.mark.parametrize("how", ["flip", "tear"])
def test_a_damaged_newest_commit_on_every_disk_opens_the_previous_generation(
    tmp_path: Path, what: str, how: str
) -> None:
    """The newest commit (a journal record, or a checkpoint into the other slot) ruined on
    every disk (a power cut during the commit): the pool opens at the generation before,
    with that generation's map."""
    paths = image_files(tmp_path, 3)

    async def build() -> tuple[str, list[bytes], list[int], int]:
        devices = [open_device(str(p)) for p in paths]
        pool = await Pool.create("ab", devices, media=["hdd"] * 3, slab_size=MiB,
                                 meta_slot_size=META_SLOT)
        try:
            await pool.create_volume("v1", MiB, MIRROR, "thin")
            if what == "checkpoint":  # the next commit must checkpoint into slot 1
                pool.journal.tail = META_SLOT
            slot, offset = (1, 0) if what == "checkpoint" else (0, pool.journal.tail)
            offsets = [pool.disks[i].geometry.meta_slot_offset(slot) + offset for i in range(3)]
            before = [device.read_sync(o, 16384) for device, o in zip(devices, offsets,
                                                                      strict=True)]
            await pool.create_volume("v2", MiB, MIRROR, "thin")
            assert pool.journal.slot == slot
            return pool.uuid, before, offsets, pool.metadata.generation
        finally:
            pool.close()

    pool_uuid, before, offsets, newest = trio.run(build)
    for path, offset, old in zip(paths, offsets, before, strict=True):
        damage(path, offset, how, old)

    async def reopen() -> PoolMetadata:
        pool = await Pool.open([open_device(str(p)) for p in paths])
        try:
            return pool.metadata
        finally:
            pool.close()

    metadata = trio.run(reopen)
    assert metadata.pool_uuid == pool_uuid
    assert metadata.generation == newest - 1
    assert [v.name for v in metadata.volumes] == ["v1"]


# --------------------------------------------------------------------------------------------
# row 7: a read that times out fails the disk, durably, and is served from the other copy


@pytest.mark.parametrize("hung", [
    0,  # the copy a read of row 0 tries first: its data read times out
    1,  # the other copy: its checksum entries are read to pick the newest copy
])
def test_a_disk_that_hangs_on_reads_is_failed_at_the_first_read_timeout(hung: int) -> None:
    """Reads only: no write of the workload could fail the disk through the write path.
    The first read timeout takes the disk out of service in a committed generation, the
    read is served from the other copy, and nothing waits for a second timeout. `hung`:
    which copy (in the order a read of row 0 prefers them) stops answering."""

    async def scenario() -> None:
        log: list[Op] = []
        memories = [MemoryDevice(12 * MiB, path=f"mem{i}") for i in range(3)]
        faulty = [FaultyDevice(m) for m in memories]
        devices = [Recorder(f, log) for f in faulty]
        pool = await Pool.create("h", devices, media=["hdd"] * 3, slab_size=MiB,
                                 meta_slot_size=META_SLOT)
        record = await pool.create_volume("v", 2 * MiB, MIRROR, "thin")
        payload = bytes(range(256)) * 256
        await Volume(pool, record).write(0, payload)
        await pool.flush()
        pool = await Pool.open(devices)  # as after a remount: caches cold, nothing pending
        pool.io_timeout = 5.0
        volume = Volume(pool, pool.volume("v"))
        position = data_positions(MIRROR, 0, 0)[hung]
        disk_id, _ = volume.record.slabs[0][position]
        index = [d.path for d in devices].index(pool.disks[disk_id].path)
        faulty[index].set_spec(FaultSpec(latency=3600.0))
        log.clear()

        started = trio.current_time()
        assert await volume.read(0, MIRROR.interleave) == payload[: MIRROR.interleave]
        waited = trio.current_time() - started
        assert 5.0 <= waited < 10.0  # one timeout, not a second one (a retry or repair)
        disk = pool.disks[disk_id]
        assert disk.record.state == "failed"
        assert "read within 5s" in disk.record.state_reason
        hung_ops = [op for op in log if op.disk == devices[index].path]
        assert hung_ops
        assert {op.kind for op in hung_ops} == {"read"}  # never a write (or repair) to it
        # the rest of the data comes from the other copy at once, the hung disk untouched
        log.clear()
        started = trio.current_time()
        assert await volume.read(0, len(payload)) == payload
        assert trio.current_time() - started < 1.0
        assert [op for op in log if op.disk == devices[index].path] == []
        # durable: the surviving disks' committed metadata says so
        survivors = [m for i, m in enumerate(memories) if i != index]
        reopened = await Pool.open(survivors)
        assert reopened.disks[disk_id].record.state == "failed"
        pool.close()

    trio.run(scenario, clock=trio.testing.MockClock(autojump_threshold=0))


def test_recorder_sees_every_kind_of_operation() -> None:
    """The ordering tests are only as good as the log: a write, zero and flush each leave a
    start and a done entry, in order; a failed operation leaves no done entry."""

    async def scenario() -> None:
        log: list[Op] = []
        inner = MemoryDevice(MiB)
        device = Recorder(inner, log)
        await device.write(4096, b"x" * 10)
        await device.write_many([(0, b"a"), (8192, b"b")])
        await device.zero(0, 4096)
        await device.flush()
        assert [(op.kind, op.phase, op.offset) for op in log] == [
            ("write", "start", 4096), ("write", "done", 4096),
            ("write", "start", 0), ("write", "done", 0),
            ("write", "start", 8192), ("write", "done", 8192),
            ("zero", "start", 0), ("zero", "done", 0),
            ("flush", "start", 0), ("flush", "done", 0),
        ]
        assert log[0].data == b"x" * 10
        log.clear()
        inner.failed = True
        with pytest.raises(DeviceError):
            await device.flush()
        assert [(op.kind, op.phase) for op in log] == [("flush", "start")]

    trio.run(scenario)
