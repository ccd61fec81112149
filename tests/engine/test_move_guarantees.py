"""Placement changes keep their order, and deleted volumes give their space back (issue 21,
rows 2, 3 and 8).

* A move frees the old extent only after the map without it is committed: a commit that
  fails leaves the old extent allocated, never handed to another slab.
* A move verifies what landed on the target before the map points at it: a target that
  drops or flips writes fails the move and the old map stays.
* `delete_volume` gives every extent back: the allocator's free state is what it was
  before the volume was created, in memory and after a reopen from the disks.

In-process pools on memory disks, 1 MiB slabs.
"""

import random
from collections.abc import Sequence

import pytest
import trio

from blockspace.disks.devices import Buffer, Device
from blockspace.disks.faults import FaultSpec, FaultyDevice
from blockspace.errors import DeviceError, InvalidInput
from blockspace.geometry.allocator import max_slabs
from blockspace.geometry.layouts import LayoutSpec
from blockspace.ondisk.label import DiskGeometry
from blockspace.pool.pool import Pool
from blockspace.repair.rebuild import Move, move_extent
from blockspace.testing.memory_device import MemoryDevice
from blockspace.volume.volume import Volume

MiB = 1 << 20
DISK_SIZE = 12 * MiB
MIRROR = LayoutSpec("mirror", 1, copies=2, interleave=16384)
PARITY = LayoutSpec("parity", 2, parity=1, interleave=16384)
SIMPLE = LayoutSpec("simple", 2, interleave=16384)

FreeState = dict[int, frozenset[int]]


def free_state(pool: Pool) -> FreeState:
    """Every disk's set of free extents: the whole allocator state, not just counts."""
    allocator = pool.allocator
    return {
        disk_id: frozenset(
            index for index in range(allocator.extent_count(disk_id))
            if not allocator.is_used((disk_id, index))
        )
        for disk_id in allocator.disk_ids
    }


async def new_pool(devices: Sequence[Device]) -> Pool:
    return await Pool.create("g", devices, media=["hdd"] * len(devices), slab_size=MiB,
                             meta_slot_size=64 << 10)


async def one_slab_volume(pool: Pool, spec: LayoutSpec, seed: int) -> tuple[Volume, bytes]:
    """A thin volume of exactly one slab, written in full with random (never zero) data, so
    a dropped write cannot pass for an unwritten block."""
    record = await pool.create_volume("v", spec.slab_data_size(MiB), spec, "thin")
    volume = Volume(pool, record)
    data = random.Random(seed).randbytes(volume.size)
    await volume.write(0, data)
    assert list(volume.record.slabs) == [0]
    return volume, data


def spare_disk(pool: Pool, volume: Volume) -> int:
    """The one disk that holds no extent of the volume's only slab."""
    holders = {d for d, _ in volume.record.slabs[0]}
    (spare,) = set(pool.disks) - holders
    return spare


# ---- row 2: the old extent is freed only after the commit -----------------------------------


def test_a_move_whose_commit_fails_keeps_the_old_extent_allocated(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The commit of the new map fails once: the slab keeps its old extent, the allocator
    still holds it (so a new volume filling the pool cannot take and zero it), the target is
    free again, and the old extent alone still serves the data, before and after a reopen."""

    async def scenario() -> None:
        devices = [MemoryDevice(DISK_SIZE, path=f"mem{i}") for i in range(3)]
        pool = await new_pool(devices)
        volume, data = await one_slab_volume(pool, MIRROR, seed=21)
        before_map = list(volume.record.slabs[0])
        old = before_map[0]
        target = spare_disk(pool, volume)
        before_free = free_state(pool)
        generation = pool.metadata.generation

        real_commit = pool.commit
        calls = 0

        async def commit_failing_once() -> None:
            nonlocal calls
            calls += 1
            if calls == 1:
                raise DeviceError("injected: metadata commit failed")
            await real_commit()

        monkeypatch.setattr(pool, "commit", commit_failing_once)
        with pytest.raises(DeviceError, match="injected"):
            await move_extent(volume, Move("v", 0, 0, old[0], target=target))
        assert calls == 1  # the move did reach its commit

        assert volume.record.slabs[0] == before_map
        assert pool.allocator.is_used(old), "the old extent was freed without a committed map"
        assert free_state(pool) == before_free  # and the target extent was given back
        assert pool.metadata.generation == generation

        # Fill every free extent with a new fixed volume and write all of it: had the old
        # extent been free, this would zero and overwrite the slab's first copy.
        fill = max_slabs(pool.allocator.free_map(), MIRROR.width)
        assert fill > 0
        other = Volume(pool, await pool.create_volume(
            "w", fill * MIRROR.slab_data_size(MiB), MIRROR, "fixed"))
        assert all(old not in extents for extents in other.record.slabs.values())
        await other.write(0, random.Random(22).randbytes(other.size))
        assert await volume.read(0, volume.size) == data

        # The disks agree: reopened, the map still has the old extent, and with the other
        # copy's disk gone the data comes from the old extent alone.
        reopened = await Pool.open(devices)
        revolume = Volume(reopened, reopened.volume("v"))
        assert revolume.record.slabs[0] == before_map
        assert reopened.allocator.is_used(old)
        other_copy = before_map[1][0]
        devices[other_copy].failed = True
        await reopened.mark_failed(other_copy, "test: the other copy is gone")
        assert await revolume.read(0, volume.size) == data

    trio.run(scenario)


# ---- row 3: the copy is verified before the map points at it ---------------------------------


class TamperingDisk(MemoryDevice):
    """A memory disk that, while `mode` is set, drops or bit-flips the writes that land in
    extents' data ("data") or in their checksum areas ("entries"); labels and metadata are
    written faithfully, so only the copy itself is damaged."""

    def __init__(self, size: int, path: str) -> None:
        super().__init__(size, path)
        self.mode: str | None = None  # None, "drop" or "flip"
        self.area = "data"
        self.geometry: DiskGeometry | None = None
        self.tampered = 0

    def _targeted(self, offset: int) -> bool:
        geometry = self.geometry
        if self.mode is None or geometry is None:
            return False
        if not geometry.data_start <= offset < geometry.backup_label_offset:
            return False
        in_data = (offset - geometry.data_start) % geometry.extent_stride < geometry.slab_size
        return in_data == (self.area == "data")

    def write_sync(self, offset: int, data: Buffer) -> None:
        if not self._targeted(offset):
            super().write_sync(offset, data)
            return
        self.tampered += 1
        if self.mode == "drop":
            return  # reported done, never done
        damaged = bytearray(memoryview(data).cast("B"))
        damaged[len(damaged) // 2] ^= 0x10
        super().write_sync(offset, damaged)


async def check_failed_move_left_the_old_map(
    pool: Pool, volume: Volume, devices: list[MemoryDevice], before_map: list[tuple[int, int]],
    data: bytes,
) -> None:
    """After a move that had to fail: the map, the allocator and the data are as before, on
    the disks too, and the source extent serves reads with the rest of its slab's
    tolerance used up (so it is the source, not the damaged target, that holds the data)."""
    assert volume.record.slabs[0] == before_map
    assert await volume.read(0, volume.size) == data
    reopened = await Pool.open(devices)
    revolume = Volume(reopened, reopened.volume("v"))
    assert revolume.record.slabs[0] == before_map
    # Lose one other disk of the slab: only the source extent (and, for parity, the
    # remaining column) can give the data now.
    lost = before_map[1][0]
    devices[lost].failed = True
    await reopened.mark_failed(lost, "test: another disk of the slab is gone")
    assert await revolume.read(0, volume.size) == data


LAYOUTS = [pytest.param(MIRROR, id="mirror-2"), pytest.param(PARITY, id="parity-1")]




@pytest.mark.parametrize("spec", LAYOUTS)
@pytest.mark.parametrize("mode", ["drop", "flip"])
@pytest.mark.parametrize("area", ["data", "entries"])
def test_a_move_onto_a_target_that_damages_the_copy_fails_and_keeps_the_old_map(
    spec: LayoutSpec, mode: str, area: str
) -> None:
    """The target disk drops or flips a bit in the writes of the copy, in its data or in
    its checksum entries (both are the copy: with either wrong, the extent does not verify
    once its entries are read from the disk)."""

    async def scenario() -> None:
        devices: list[MemoryDevice] = [
            TamperingDisk(DISK_SIZE, path=f"mem{i}") for i in range(spec.width + 1)
        ]
        pool = await new_pool(devices)
        volume, data = await one_slab_volume(pool, spec, seed=31)
        before_map = list(volume.record.slabs[0])
        source = before_map[0]
        target = spare_disk(pool, volume)
        before_free = free_state(pool)
        generation = pool.metadata.generation
        bad = devices[target]
        assert isinstance(bad, TamperingDisk)
        bad.geometry = pool.disks[target].geometry
        bad.mode = mode
        bad.area = area

        with pytest.raises(DeviceError, match="verification of the copy"):
            await move_extent(volume, Move("v", 0, 0, source[0], target=target))
        bad.mode = None
        assert bad.tampered > 0  # the fault did hit the copy
        assert pool.metadata.generation == generation  # nothing was committed
        assert free_state(pool) == before_free  # the target extent was given back
        await check_failed_move_left_the_old_map(pool, volume, devices, before_map, data)

    trio.run(scenario)


@pytest.mark.parametrize("spec", LAYOUTS)
def test_a_move_onto_a_disk_that_drops_every_write_fails(spec: LayoutSpec) -> None:
    """The project's fault layer (`FaultyDevice`, drop_writes): data and checksum entries
    alike vanish, so the target reads back zeros; the verify must still see the copy is not
    the data it was given."""

    async def scenario() -> None:
        inner = [MemoryDevice(DISK_SIZE, path=f"mem{i}") for i in range(spec.width + 1)]
        faulty = [FaultyDevice(device) for device in inner]
        pool = await new_pool(faulty)
        volume, data = await one_slab_volume(pool, spec, seed=41)
        before_map = list(volume.record.slabs[0])
        target = spare_disk(pool, volume)
        generation = pool.metadata.generation
        faulty[target].set_spec(FaultSpec(drop_writes=True))

        with pytest.raises(DeviceError, match="verification of the copy"):
            await move_extent(volume, Move("v", 0, 0, before_map[0][0], target=target))
        assert faulty[target].statistics().dropped_writes > 0
        faulty[target].clear()
        assert pool.metadata.generation == generation
        await check_failed_move_left_the_old_map(pool, volume, inner, before_map, data)

    trio.run(scenario)


# ---- row 8: a deleted volume gives its extents back ------------------------------------------


@pytest.mark.parametrize("provisioning", ["fixed", "thin"])
def test_deleting_a_volume_returns_the_free_state_to_what_it_was(provisioning: str) -> None:
    async def scenario() -> None:
        devices = [MemoryDevice(DISK_SIZE, path=f"mem{i}") for i in range(3)]
        pool = await new_pool(devices)
        # Another volume stays: the deleted one's extents sit among extents still in use.
        keep = Volume(pool, await pool.create_volume("keep", 2 * MiB, MIRROR, "thin"))
        kept = random.Random(51).randbytes(keep.size)
        await keep.write(0, kept)
        before = free_state(pool)
        before_counts = pool.allocator.free_map()

        slab_data = SIMPLE.slab_data_size(MiB)
        volume = Volume(pool, await pool.create_volume("v", 5 * slab_data, SIMPLE,
                                                       provisioning))
        rng = random.Random(52)
        # Slabs 0, 2 and 4 written (a thin volume allocates just those), 1 and 3 not.
        for slab in (0, 2, 4):
            await volume.write(slab * slab_data + 8192, rng.randbytes(3 * 4096))
        expected_slabs = 5 if provisioning == "fixed" else 3
        assert len(volume.record.slabs) == expected_slabs
        held = {e for extents in volume.record.slabs.values() for e in extents}
        assert len(held) == expected_slabs * SIMPLE.width
        assert free_state(pool) == {d: before[d] - {e for h, e in held if h == d}
                                    for d in before}

        await pool.delete_volume("v")
        assert free_state(pool) == before
        assert pool.allocator.free_map() == before_counts
        assert await keep.read(0, keep.size) == kept

        reopened = await Pool.open(devices)
        with pytest.raises(InvalidInput, match="no volume 'v'"):
            reopened.volume("v")
        assert free_state(reopened) == before
        assert await Volume(reopened, reopened.volume("keep")).read(0, keep.size) == kept

    trio.run(scenario)


def test_a_volume_on_a_deleted_volumes_extents_reads_zeros() -> None:
    """Freed extents are zeroed when they are reused: the next volume never shows the
    deleted one's data."""

    async def scenario() -> None:
        devices = [MemoryDevice(DISK_SIZE, path=f"mem{i}") for i in range(3)]
        pool = await new_pool(devices)
        size = 3 * SIMPLE.slab_data_size(MiB)
        old = Volume(pool, await pool.create_volume("old", size, SIMPLE, "fixed"))
        await old.write(0, random.Random(61).randbytes(size))
        old_extents = {e for extents in old.record.slabs.values() for e in extents}
        await pool.delete_volume("old")

        new = Volume(pool, await pool.create_volume("new", size, SIMPLE, "fixed"))
        reused = {e for extents in new.record.slabs.values() for e in extents} & old_extents
        assert reused  # the lowest free extents: the ones just freed
        assert await new.read(0, size) == bytes(size)

    trio.run(scenario)
