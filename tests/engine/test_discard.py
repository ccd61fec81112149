"""Discard (blockspace/volume/discard.py, `Volume.discard`, `Pool.free_slabs`) in-process on
memory disks: whole slabs of a thin volume are unmapped and their extents go back to the
pool, durably before the call returns; partial slabs read as zeros with redundancy kept
consistent; fixed volumes and NO_HOLE only zero; a failed commit unmaps nothing; power cuts at
every device operation of a discard; discards racing writes, reads, degraded reads and moves.
"""

import random
from collections import Counter

import pytest
import trio

from blockspace.errors import DeviceError
from blockspace.geometry.layouts import LayoutSpec
from blockspace.pool.pool import Pool
from blockspace.repair.rebuild import Move, move_extent
from blockspace.repair.scrub import scrub_slab
from blockspace.testing import crashsim
from blockspace.testing.memory_device import MemoryDevice
from blockspace.volume.discard import ZERO_CHUNK, plan_discard
from blockspace.volume.volume import Volume

MiB = 1 << 20
SLAB = MiB
DISK = 12 * MiB

LAYOUTS = {
    "simple-1": LayoutSpec("simple", 1, interleave=16384),
    "mirror-2": LayoutSpec("mirror", 1, copies=2, interleave=16384),
    "parity-1": LayoutSpec("parity", 2, parity=1, interleave=8192),
}


async def make_volume(spec: LayoutSpec, *, slabs: int = 4, provisioning: str = "thin",
                      disks: int = 3) -> tuple[Pool, Volume, list[MemoryDevice]]:
    devices = [MemoryDevice(DISK, path=f"mem{i}") for i in range(disks)]
    pool = await Pool.create("test", devices, media=["hdd"] * disks, slab_size=SLAB,
                             meta_slot_size=64 << 10)
    record = await pool.create_volume("vol", spec.slab_data_size(SLAB) * slabs, spec,
                                      provisioning)
    return pool, Volume(pool, record), devices


def pattern(seed: int, length: int) -> bytes:
    return random.Random(seed).randbytes(length)


def free_extents(pool: Pool) -> int:
    return sum(pool.allocator.free_map().values())


def check_allocator(pool: Pool) -> None:
    """The allocator's view and the map agree: every mapped extent is in use, none twice, and
    nothing else is in use."""
    used = pool.metadata.used_extents()
    assert not [e for e, n in Counter(used).items() if n > 1], "an extent mapped twice"
    total = sum(d.record.extent_count for d in pool.disks.values())
    assert free_extents(pool) == total - len(used)


# ---- the plan (pure) --------------------------------------------------------------------

def test_plan_unmaps_whole_slabs_and_zeroes_the_rest_in_aligned_chunks() -> None:
    size = 4 * ZERO_CHUNK
    plan = plan_discard(size, size - 4096, 2 * size + 8192, unmap=True)
    assert plan.unmap == [1, 2]
    assert plan.zero == [(size - 4096, 4096), (3 * size, 4096)]
    plan = plan_discard(size, 100, size, unmap=True)  # a slab's worth, but not a whole slab
    assert plan.unmap == []
    assert plan.zero[0] == (100, ZERO_CHUNK - 100)
    assert all(n <= ZERO_CHUNK and (o + n) % ZERO_CHUNK in (0, 100) for o, n in plan.zero)
    assert sum(n for _, n in plan.zero) == size
    plan = plan_discard(size, 0, 2 * size, unmap=False)  # NO_HOLE, fixed volumes
    assert plan.unmap == []
    assert plan.zero == [(i * ZERO_CHUNK, ZERO_CHUNK) for i in range(8)]


# ---- whole and partial slabs ------------------------------------------------------------

@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_whole_slab_discard_frees_its_extents_durably_and_reads_zeros(layout: str) -> None:
    spec = LAYOUTS[layout]

    async def main() -> None:
        pool, volume, devices = await make_volume(spec)
        size = volume.slab_data_size
        data = pattern(1, 4 * size)
        await volume.write(0, data)
        assert len(volume.record.slabs) == 4
        free_before = free_extents(pool)
        generation = pool.metadata.generation
        # Slabs 1 and 2 whole, and the last block of slab 0 and first of slab 3.
        await volume.discard(size - 4096, 2 * size + 8192)
        assert sorted(volume.record.slabs) == [0, 3]
        assert free_extents(pool) == free_before + 2 * spec.width
        assert pool.metadata.generation > generation  # committed before it returned
        check_allocator(pool)
        expected = bytearray(data)
        expected[size - 4096 : 3 * size + 4096] = bytes(2 * size + 8192)
        assert await volume.read(0, 4 * size) == expected
        for slab in (0, 3):
            report = await scrub_slab(volume, slab, repair=False)
            assert (report.checksum_errors, report.mismatches) == (0, 0)
        # The map without them is what is on the disks.
        reopened = await Pool.open(devices)
        assert sorted(reopened.volume("vol").slabs) == [0, 3]
        assert Volume(reopened, reopened.volume("vol")).statistics().allocated_slabs == 2
        # A later write allocates afresh, and reads back.
        await volume.write(size + 5000, b"new" * 1000)
        assert sorted(volume.record.slabs) == [0, 1, 3]
        expected[size + 5000 : size + 8000] = b"new" * 1000
        assert await volume.read(0, 4 * size) == expected
        check_allocator(pool)

    trio.run(main)


@pytest.mark.parametrize("layout", ["mirror-2", "parity-1"])
def test_partial_discard_keeps_redundancy_consistent(layout: str) -> None:
    """Zeroed blocks read as zeros from every copy, and from parity with a disk gone."""
    spec = LAYOUTS[layout]

    async def main() -> None:
        pool, volume, devices = await make_volume(spec)
        size = volume.slab_data_size
        data = pattern(2, 2 * size)
        await volume.write(0, data)
        start, length = 12345, size // 2 + 777  # unaligned, across rows
        await volume.discard(start, length)
        assert sorted(volume.record.slabs) == [0, 1]  # nothing unmapped
        expected = bytearray(data)
        expected[start : start + length] = bytes(length)
        assert await volume.read(0, 2 * size) == expected
        report = await scrub_slab(volume, 0, repair=False)
        assert (report.checksum_errors, report.mismatches) == (0, 0)
        disk_id = volume.record.slabs[0][0][0]
        await pool.set_state(disk_id, "failed", "test: served from the others")
        assert await volume.read(0, 2 * size) == expected

    trio.run(main)


def test_fixed_volume_and_no_hole_only_zero() -> None:
    async def main() -> None:
        spec = LAYOUTS["mirror-2"]
        pool, volume, _ = await make_volume(spec, provisioning="fixed")
        size = volume.slab_data_size
        await volume.write(0, pattern(3, 4 * size))
        free_before = free_extents(pool)
        await volume.discard(0, 2 * size)
        assert len(volume.record.slabs) == 4
        assert free_extents(pool) == free_before
        assert await volume.read(0, 2 * size) == bytes(2 * size)

        pool, volume, _ = await make_volume(spec)
        await volume.write(0, pattern(3, 2 * size))
        await volume.discard(0, size, unmap=False)  # WRITE_ZEROES with NO_HOLE
        assert sorted(volume.record.slabs) == [0, 1]
        assert await volume.read(0, size) == bytes(size)
        await volume.discard(2 * size, 2 * size)  # never written: nothing to do
        assert sorted(volume.record.slabs) == [0, 1]

    trio.run(main)


def test_a_failed_unmap_commit_leaves_the_slab_mapped_and_its_extents_taken() -> None:
    async def main() -> None:
        pool, volume, devices = await make_volume(LAYOUTS["mirror-2"])
        size = volume.slab_data_size
        data = pattern(4, 2 * size)
        await volume.write(0, data)
        free_before = free_extents(pool)
        extents = volume.record.slabs[1]
        for device in devices:
            device.failed = True
        with pytest.raises(DeviceError):
            await volume.discard(size, size)
        assert volume.record.slabs[1] == extents
        assert free_extents(pool) == free_before

    trio.run(main)


def test_extents_stay_allocated_until_the_unmap_is_committed() -> None:
    """While the commit that unmaps a slab is in flight, its extents cannot be handed out."""

    async def main() -> None:
        pool, volume, _ = await make_volume(LAYOUTS["mirror-2"])
        size = volume.slab_data_size
        await volume.write(0, pattern(5, size))
        extents = list(volume.record.slabs[0])
        commit = pool.commit
        seen: list[int] = []

        async def watching_commit(*, seal: bool = False) -> None:
            seen.append(free_extents(pool))
            await commit(seal=seal)

        free_before = free_extents(pool)
        pool.commit = watching_commit  # type: ignore[method-assign]
        await volume.discard(0, size)
        assert seen == [free_before]
        assert free_extents(pool) == free_before + len(extents)

    trio.run(main)


# ---- crashes ------------------------------------------------------------------------------

def test_power_cut_at_every_operation_of_a_discard_and_a_reuse() -> None:
    """Discard slab 0 (returned: durable without a flush), then a write that may take its
    extents for slab 2, flushed. Cut at each device operation in turn: the pool opens, no
    extent is mapped twice, slab 0 reads as its old data or zeros (zeros once the discard
    returned), slab 1 is untouched and slab 2 holds its data once its flush returned."""
    spec = LayoutSpec("mirror", 1, copies=2, interleave=16384)
    size = spec.slab_data_size(MiB)
    old, other, new = pattern(6, size), pattern(7, size), pattern(8, size)

    async def trial(cut_after: int) -> bool:
        rig = await crashsim.crash_pool(spec, disks=2, disk_size=5 * MiB)
        await rig.volume.write(0, old)
        await rig.volume.write(size, other)
        await rig.volume.flush()
        rig.rail.arm(cut_after, rng=random.Random(cut_after), mode="torn")
        discarded = written = False
        try:
            await rig.volume.discard(0, size)
            discarded = True
            await rig.volume.write(2 * size, new)
            await rig.volume.flush()
            written = True
        except DeviceError:
            pass
        cut = rig.rail.off
        pool, volume = await rig.reboot()
        used = pool.metadata.used_extents()
        assert len(used) == len(set(used)), f"cut {cut_after}: an extent mapped twice"
        first = await volume.read(0, size)
        assert first in (old, bytes(size)), f"cut {cut_after}: slab 0 is neither"
        if discarded:
            assert 0 not in volume.record.slabs, f"cut {cut_after}: the unmap was lost"
        assert await volume.read(size, size) == other
        if written:
            assert await volume.read(2 * size, size) == new
        check_allocator(pool)
        return cut

    async def main() -> None:
        cut_after = 1
        while await trial(cut_after):
            cut_after += 1
        assert cut_after > 10  # the sweep went through the discard and the reuse

    trio.run(main)


# ---- concurrency ----------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["mirror-2", "parity-1"])
def test_discard_racing_writes_of_the_same_slab(layout: str) -> None:
    """A write of a whole slab and a discard of it: the slab ends all data (the write came
    last) or all zeros (the discard did), and the allocator agrees with the map."""
    spec = LAYOUTS[layout]

    async def main() -> None:
        pool, volume, _ = await make_volume(spec, slabs=2)
        size = volume.slab_data_size
        outcomes: Counter[str] = Counter()
        for round_number in range(30):
            data = pattern(round_number, size)
            rng = random.Random(round_number)

            async def write(data: bytes = data, delay: int = rng.randrange(4)) -> None:
                for _ in range(delay):
                    await trio.lowlevel.checkpoint()
                await volume.write(0, data)

            async def discard(delay: int = rng.randrange(4)) -> None:
                for _ in range(delay):
                    await trio.lowlevel.checkpoint()
                await volume.discard(0, size)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(write)
                nursery.start_soon(discard)
                nursery.start_soon(volume.write, size, pattern(99, 4096))  # a neighbour
            got = await volume.read(0, size)
            assert got in (data, bytes(size)), f"round {round_number}: torn"
            outcomes["data" if got == data else "zeros"] += 1
            check_allocator(pool)
        assert await volume.read(size, 4096) == pattern(99, 4096)
        assert set(outcomes) == {"data", "zeros"}, outcomes  # both orders happened

    trio.run(main)


def test_a_write_that_found_the_slab_mapped_allocates_again_after_a_discard() -> None:
    """The window a random race rarely hits: a write has looked the slab up (mapped) and
    not yet taken its row locks when a discard unmaps it. It must allocate afresh and land,
    not fail or write into the freed extents."""

    async def main() -> None:
        pool, volume, _ = await make_volume(LAYOUTS["mirror-2"], slabs=2)
        size = volume.slab_data_size
        await volume.write(0, pattern(12, size))
        old_extents = volume.record.slabs[0]
        before_io = volume.region_resync.before_io
        looked_up, go_on = trio.Event(), trio.Event()

        async def paused_before_io(slab: int, start: int, end: int) -> None:
            if not go_on.is_set():
                looked_up.set()
                await go_on.wait()
            await before_io(slab, start, end)

        volume.region_resync.before_io = paused_before_io  # type: ignore[method-assign]
        data = pattern(13, 8192)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(volume.write, 4096, data)
            await looked_up.wait()
            await volume.discard(0, size)
            assert 0 not in volume.record.slabs
            go_on.set()
        assert volume.record.slabs[0] is not old_extents
        assert await volume.read(0, 4 * 4096) == bytes(4096) + data + bytes(4096)
        check_allocator(pool)

    trio.run(main)


class PausedColumnReads:
    """A redundancy whose column reads wait for `go_on` (setting `looked_up` first): a
    wrapper, since where mirror.py is compiled its methods cannot be replaced."""

    def __init__(self, inner: object, looked_up: trio.Event, go_on: trio.Event) -> None:
        self.inner, self.looked_up, self.go_on = inner, looked_up, go_on

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)

    async def read_column(self, *args: object, **kwargs: object) -> bytes:
        if not self.go_on.is_set():
            self.looked_up.set()
            await self.go_on.wait()
        return await self.inner.read_column(*args, **kwargs)  # type: ignore[attr-defined, no-any-return]


def test_a_read_from_extents_freed_and_reused_meanwhile_returns_zeros() -> None:
    """A read that looked the slab up, then read its extents only after a discard freed them
    and another slab's write took them: what it got is that slab's data (it verifies), and
    must not be returned; the slab is unmapped now, so the answer is zeros."""

    async def main() -> None:
        pool, volume, _ = await make_volume(LAYOUTS["simple-1"], slabs=3, disks=1)
        size = volume.slab_data_size
        await volume.write(0, pattern(14, size))
        old_extents = list(volume.record.slabs[0])
        looked_up, go_on = trio.Event(), trio.Event()
        volume.redundancy = PausedColumnReads(  # type: ignore[assignment]
            volume.redundancy, looked_up, go_on)
        got: list[bytes] = []

        async def read() -> None:
            got.append(bytes(await volume.read(0, 65536)))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
            await looked_up.wait()
            await volume.discard(0, size)
            secret = pattern(15, size)
            await volume.write(2 * size, secret)
            assert volume.record.slabs[2] == old_extents  # the freed extent, reused
            go_on.set()
        assert got == [bytes(65536)]

    trio.run(main)


def test_degraded_reads_racing_a_discard_return_old_data_or_zeros() -> None:
    """With a disk out, parity reads of a slab rebuild under its row locks: a discard that
    unmaps it meanwhile makes them read again (zeros), not fail."""

    async def main() -> None:
        pool, volume, _ = await make_volume(LAYOUTS["parity-1"], slabs=2)
        size = volume.slab_data_size
        data = pattern(10, size)
        for round_number in range(10):
            await volume.write(0, data)
            if round_number == 0:
                disk_id = volume.record.slabs[0][0][0]
                await pool.set_state(disk_id, "failed", "test: degraded reads")
            results: list[bytes] = []

            async def read(offset: int, results: list[bytes] = results) -> None:
                got = bytes(await volume.read(offset, 65536))
                assert got in (data[offset : offset + 65536], bytes(65536))
                results.append(got)

            async with trio.open_nursery() as nursery:
                for offset in range(0, size, 65536):
                    nursery.start_soon(read, offset)
                for _ in range(round_number):
                    await trio.lowlevel.checkpoint()
                nursery.start_soon(volume.discard, 0, size)
            assert len(results) == size // 65536
            assert await volume.read(0, size) == bytes(size)

    trio.run(main)


@pytest.mark.parametrize("discard_first", [False, True])
def test_discard_racing_a_move_of_the_slab(discard_first: bool) -> None:
    """A rebuild move of a slab's extent and a discard of the slab, in either order: the
    slab ends unmapped, and every extent is either mapped once or free."""

    async def main() -> None:
        pool, volume, _ = await make_volume(LAYOUTS["mirror-2"], slabs=2, disks=3)
        size = volume.slab_data_size
        await volume.write(0, pattern(11, 2 * size))
        disk_id = volume.record.slabs[0][0][0]
        move = Move("vol", 0, 0, disk_id)
        async with trio.open_nursery() as nursery:
            if discard_first:
                nursery.start_soon(volume.discard, 0, size)
                await trio.lowlevel.checkpoint()
                nursery.start_soon(move_extent, volume, move)
            else:
                nursery.start_soon(move_extent, volume, move)
                await trio.lowlevel.checkpoint()
                nursery.start_soon(volume.discard, 0, size)
        assert 0 not in volume.record.slabs
        check_allocator(pool)
        assert await volume.read(0, size) == bytes(size)
        assert await volume.read(size, size) == pattern(11, 2 * size)[size:]

    trio.run(main)
