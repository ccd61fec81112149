"""Rebuild, retire and replace, in-process on memory disks."""

import random

import pytest
import trio

from blockspace.errors import NoSpace
from blockspace.geometry.layouts import LayoutSpec
from blockspace.pool.pool import Pool
from blockspace.repair.rebuild import (
    Rebuilder,
    check_moves_fit,
    move_extent,
    plan_moves,
    plan_rebalance,
)
from blockspace.testing.memory_device import MemoryDevice
from blockspace.volume.volume import Volume

MiB = 1 << 20
MIRROR = LayoutSpec("mirror", 1, copies=2, interleave=16384)
PARITY = LayoutSpec("parity", 2, parity=1, interleave=16384)


async def make(spec: LayoutSpec, disks: int, disk_size: int = 12 * MiB,
               slabs: int = 4) -> tuple[Pool, Volume, list[MemoryDevice], bytes]:
    devices = [MemoryDevice(disk_size, path=f"mem{i}") for i in range(disks)]
    pool = await Pool.create("r", devices, media=["hdd"] * disks, slab_size=MiB,
                             meta_slot_size=64 << 10)
    record = await pool.create_volume("v", slabs * spec.slab_data_size(MiB), spec, "thin")
    volume = Volume(pool, record)
    data = random.Random(3).randbytes(volume.size)
    await volume.write(0, data)
    return pool, volume, devices, data


def volumes_of(volume: Volume) -> dict[str, Volume]:
    return {volume.name: volume}


@pytest.mark.parametrize("spec", [MIRROR, PARITY], ids=["mirror-2", "parity-1"])
def test_failed_disk_is_rebuilt_onto_free_space_and_redundancy_is_restored(
    spec: LayoutSpec,
) -> None:
    async def scenario() -> None:
        pool, volume, devices, data = await make(spec, disks=spec.width + 2)
        devices[0].failed = True
        await pool.mark_failed(0, "test: disk died")
        moves = plan_moves(pool, {0})
        assert moves
        check_moves_fit(pool, moves)
        progress = await Rebuilder(pool, lambda: volumes_of(volume)).run(moves, "repair")
        assert progress.state == "done"
        assert progress.done == len(moves)
        assert pool.extents_on(0) == 0
        assert await volume.read(0, volume.size) == data
        # Redundancy is whole again: another disk may now fail too.
        survivor = next(d for d in pool.usable_disk_ids() if pool.extents_on(d))
        devices[survivor].failed = True
        assert await volume.read(0, volume.size) == data
        # And the map survives a reopen.
        devices[survivor].failed = False
        reopened = await Pool.open(devices[1:])
        assert await Volume(reopened, reopened.volume("v")).read(0, volume.size) == data

    trio.run(scenario)


def test_retire_evacuates_a_healthy_disk_and_remove_forgets_it() -> None:
    async def scenario() -> None:
        pool, volume, devices, data = await make(MIRROR, disks=4)
        busy = next(d for d in pool.disks if pool.extents_on(d))
        await pool.set_state(busy, "retiring", "test")
        await Rebuilder(pool, lambda: volumes_of(volume)).run(plan_moves(pool, {busy}), "t")
        assert pool.extents_on(busy) == 0
        reads_before = devices[busy].statistics().reads
        assert await volume.read(0, volume.size) == data
        assert devices[busy].statistics().reads == reads_before  # nothing read from it
        await pool.remove_disk(busy)
        assert busy not in pool.disks
        assert devices[busy].data[:8] == bytes(8)  # label wiped: no longer a member
        reopened = await Pool.open(devices)
        assert busy not in reopened.disks
        assert await Volume(reopened, reopened.volume("v")).read(0, volume.size) == data

    trio.run(scenario)


def test_replace_prefers_the_new_disk() -> None:
    async def scenario() -> None:
        pool, volume, devices, data = await make(MIRROR, disks=3)
        old = next(d for d in pool.disks if pool.extents_on(d))
        count = pool.extents_on(old)
        new = await pool.add_disk(MemoryDevice(12 * MiB, path="new"), "ssd")
        new_id = new.record.disk_id
        await pool.set_state(old, "retiring", "replaced")
        await Rebuilder(pool, lambda: volumes_of(volume)).run(
            plan_moves(pool, {old}), "replace", prefer=new_id
        )
        assert pool.extents_on(old) == 0
        assert pool.extents_on(new_id) == count
        assert await volume.read(0, volume.size) == data

    trio.run(scenario)


def test_retire_that_cannot_fit_is_refused_before_anything_moves() -> None:
    async def scenario() -> None:
        pool, volume, _, data = await make(MIRROR, disks=2)
        generation = pool.metadata.generation
        with pytest.raises(NoSpace, match="would have no disk"):
            check_moves_fit(pool, plan_moves(pool, {0}))
        assert pool.metadata.generation == generation
        assert pool.disks[0].record.state == "online"
        assert await volume.read(0, volume.size) == data

    trio.run(scenario)


def test_a_rebuild_cut_short_leaves_a_consistent_map_and_resumes_by_planning_again() -> None:
    async def scenario() -> None:
        pool, volume, devices, data = await make(PARITY, disks=5)
        devices[1].failed = True
        await pool.mark_failed(1, "test")
        moves = plan_moves(pool, {1})
        assert len(moves) >= 2
        await move_extent(volume, moves[0])  # then the daemon dies
        devices[1].failed = False  # its stale copy must not be trusted again
        reopened = await Pool.open(devices)
        assert reopened.disks[1].record.state == "failed"
        revolume = Volume(reopened, reopened.volume("v"))
        assert await revolume.read(0, volume.size) == data
        remaining = plan_moves(reopened, {1})
        assert len(remaining) == len(moves) - 1
        await Rebuilder(reopened, lambda: volumes_of(revolume)).run(remaining, "resume")
        assert reopened.extents_on(1) == 0
        assert await revolume.read(0, volume.size) == data

    trio.run(scenario)


def test_simple_volume_on_a_failed_disk_reports_the_lost_slab() -> None:
    async def scenario() -> None:
        pool, volume, devices, _ = await make(LayoutSpec("simple", 1), disks=3, slabs=3)
        victim = next(d for d in pool.disks if pool.extents_on(d))
        devices[victim].failed = True
        await pool.mark_failed(victim, "test")
        progress = await Rebuilder(pool, lambda: volumes_of(volume)).run(
            plan_moves(pool, {victim}), "repair"
        )
        assert progress.state == "failed"
        assert progress.failed == pool.extents_on(victim)
        assert "no readable copy" in progress.errors[0]

    trio.run(scenario)


def test_rebalance_spreads_extents_over_added_disks() -> None:
    async def scenario() -> None:
        pool, volume, _, data = await make(MIRROR, disks=2, slabs=8)
        for i in range(2):
            await pool.add_disk(MemoryDevice(12 * MiB, path=f"added{i}"), "hdd")
        before = {d: pool.extents_on(d) for d in pool.disks}
        assert before[2] == before[3] == 0
        moves = plan_rebalance(pool)
        progress = await Rebuilder(pool, lambda: volumes_of(volume)).run(moves, "rebalance")
        assert progress.state == "done"
        after = [pool.extents_on(d) for d in sorted(pool.disks)]
        assert max(after) - min(after) <= 1, after
        assert sum(after) == sum(before.values())
        assert await volume.read(0, volume.size) == data
        assert plan_rebalance(pool) == []  # balanced: nothing more to do

    trio.run(scenario)


@pytest.mark.parametrize("spec", [MIRROR, PARITY], ids=["mirror-2", "parity-1"])
def test_writes_racing_a_rebuild_reach_the_rebuilt_extents(spec: LayoutSpec) -> None:
    """A write that waits for the row locks while a move copies its slab must land on the
    map the move switched to, not on the extent it freed (scenario suite, finding 2)."""

    async def scenario() -> None:
        pool, volume, devices, data = await make(spec, disks=spec.width + 2, slabs=6)
        for device in devices:
            device.delay = 0.0005  # every I/O yields, so writes and moves interleave
        model = bytearray(data)
        devices[0].failed = True
        await pool.mark_failed(0, "test: disk died")
        moves = plan_moves(pool, {0})
        rng = random.Random(9)
        done = trio.Event()

        async def writer() -> None:
            while not done.is_set():
                offset = rng.randrange(0, volume.size // 4096) * 4096
                length = min(rng.choice([4096, 16384, 65536]), volume.size - offset)
                payload = rng.randbytes(length)
                await volume.write(offset, payload)
                model[offset : offset + length] = payload

        async def rebuild() -> None:
            await Rebuilder(pool, lambda: volumes_of(volume)).run(moves, "repair")
            done.set()

        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(writer)
            nursery.start_soon(rebuild)
        assert pool.extents_on(0) == 0
        assert await volume.read(0, volume.size) == bytes(model)
        # Every copy or parity column agrees: the rebuilt extents got the racing writes.
        from blockspace.repair.scrub import scrub_slab

        for slab in volume.record.slabs:
            report = await scrub_slab(volume, slab, repair=False)
            assert (report.mismatches, report.checksum_errors) == (0, 0), slab
        # And with another disk gone, the data comes from the rebuilt extents.
        survivor = next(d for d in pool.usable_disk_ids() if pool.extents_on(d))
        devices[survivor].failed = True
        await pool.mark_failed(survivor, "test")
        assert await volume.read(0, volume.size) == bytes(model)

    trio.run(scenario)


DUAL = LayoutSpec("parity", 2, parity=2, interleave=16384)


@pytest.mark.parametrize("spec", [MIRROR, DUAL], ids=["mirror-2", "parity-2"])
def test_a_degraded_thin_volume_places_new_slabs_and_a_replace_completes_them(
    spec: LayoutSpec,
) -> None:
    """No disk outside the layout's width: with tolerance-many disks dead, writes into
    unallocated space still succeed (the slab's absent extents wait on the dead disks),
    and replacing the dead disks rebuilds those extents too (scenario finding 1)."""

    async def scenario() -> None:
        devices = [MemoryDevice(12 * MiB, path=f"mem{i}") for i in range(spec.width)]
        pool = await Pool.create("d", devices, media=["hdd"] * spec.width, slab_size=MiB,
                                 meta_slot_size=64 << 10)
        record = await pool.create_volume("v", 6 * spec.slab_data_size(MiB), spec, "thin")
        volume = Volume(pool, record)
        model = bytearray(volume.size)
        first = random.Random(1).randbytes(spec.slab_data_size(MiB))
        await volume.write(0, first)
        model[: len(first)] = first
        dead = list(range(1, 1 + spec.tolerance))
        for disk_id in dead:
            devices[disk_id].failed = True
            await pool.mark_failed(disk_id, "test: died")
        later = random.Random(2).randbytes(2 * spec.slab_data_size(MiB) + 4096)
        at = 3 * spec.slab_data_size(MiB) - 4096
        await volume.write(at, later)
        model[at : at + len(later)] = later
        assert len(volume.record.slabs) == 4  # slab 0, then 2, 3, 4 placed degraded
        assert await volume.read(0, volume.size) == bytes(model)
        # Replace every dead disk: every slab, the degraded ones too, is whole again.
        for disk_id in dead:
            new = await pool.add_disk(MemoryDevice(12 * MiB, path=f"new{disk_id}"), "hdd")
            moves = plan_moves(pool, {disk_id})
            check_moves_fit(pool, moves)
            progress = await Rebuilder(pool, lambda: volumes_of(volume)).run(
                moves, "replace", prefer=new.record.disk_id)
            assert progress.state == "done", progress.errors
            assert pool.extents_on(disk_id) == 0
        from blockspace.repair.scrub import scrub_slab

        for slab in volume.record.slabs:
            report = await scrub_slab(volume, slab, repair=False)
            assert (report.mismatches, report.checksum_errors) == (0, 0), slab
        # The survivors may now fail in turn: the rebuilt extents carry the data.
        for disk_id in range(spec.width)[-spec.tolerance:]:
            if disk_id not in dead:
                devices[disk_id].failed = True
                await pool.mark_failed(disk_id, "test")
        devices[0].failed = True
        await pool.mark_failed(0, "test")
        assert await volume.read(0, volume.size) == bytes(model)

    trio.run(scenario)


def test_a_slab_beyond_the_tolerance_still_gets_no_space() -> None:
    async def scenario() -> None:
        devices = [MemoryDevice(12 * MiB, path=f"mem{i}") for i in range(2)]
        pool = await Pool.create("d", devices, media=["hdd"] * 2, slab_size=MiB,
                                 meta_slot_size=64 << 10)
        simple = LayoutSpec("simple", 2, interleave=16384)
        volume = Volume(pool, await pool.create_volume("v", 8 * MiB, simple, "thin"))
        devices[1].failed = True
        await pool.mark_failed(1, "test")
        generation = pool.metadata.generation
        with pytest.raises(NoSpace):
            await volume.write(0, b"x" * 4096)
        assert volume.record.slabs == {}
        assert pool.metadata.generation == generation

    trio.run(scenario)


def test_a_replace_also_takes_the_slabs_placed_on_the_old_disk_while_it_ran() -> None:
    async def scenario() -> None:
        devices = [MemoryDevice(12 * MiB, path=f"mem{i}") for i in range(4)]
        pool = await Pool.create("d", devices, media=["hdd"] * 4, slab_size=MiB,
                                 meta_slot_size=64 << 10)
        record = await pool.create_volume("v", 8 * DUAL.slab_data_size(MiB), DUAL, "thin")
        volume = Volume(pool, record)
        model = bytearray(volume.size)
        await volume.write(0, b"a" * DUAL.slab_data_size(MiB))
        model[: DUAL.slab_data_size(MiB)] = b"a" * DUAL.slab_data_size(MiB)
        for disk_id in (1, 2):
            devices[disk_id].failed = True
            await pool.mark_failed(disk_id, "test")
        new = await pool.add_disk(MemoryDevice(12 * MiB, path="new"), "hdd")
        for device in devices:
            device.delay = 0.001

        async def writer() -> None:  # new slabs: 3 disks live, one extent on disk 1 or 2
            for slab in range(1, 8):
                payload = bytes([slab]) * 8192
                await volume.write(slab * DUAL.slab_data_size(MiB), payload)
                offset = slab * DUAL.slab_data_size(MiB)
                model[offset : offset + len(payload)] = payload

        async def replace() -> None:
            await Rebuilder(pool, lambda: volumes_of(volume)).run(
                plan_moves(pool, {1}), "replace", prefer=new.record.disk_id,
                replan=lambda: plan_moves(pool, {1}))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer)
            nursery.start_soon(replace)
        assert pool.extents_on(1) == 0
        assert {d for extents in volume.record.slabs.values() for d, _ in extents} == {
            0, 2, 3, new.record.disk_id}  # degraded slabs went to disk 2, not disk 1
        assert await volume.read(0, volume.size) == bytes(model)

    trio.run(scenario)


def test_a_tier_rebuilt_or_rebalanced_keeps_its_media_class() -> None:
    from blockspace.tiering.admin import create_tiered, parse_tier

    async def scenario() -> None:
        media = ["ssd", "ssd", "ssd", "hdd", "hdd", "hdd", "hdd"]
        devices = [MemoryDevice(12 * MiB, path=f"mem{i}") for i in range(len(media))]
        pool = await Pool.create("m", devices, media=media, slab_size=MiB,
                                 meta_slot_size=128 << 10)
        await create_tiered(pool, "v", [parse_tier("ssd:1M:mirror-2"),
                                        parse_tier("hdd:4M:mirror-2")], unit=64 << 10)
        tiers = pool.metadata.volume("v").tiers
        assert tiers is not None
        hdd = Volume(pool, pool.metadata.volume(tiers.hdd))
        data = random.Random(5).randbytes(hdd.size)
        await hdd.write(0, data)
        hdd_disks = {d for d, m in enumerate(media) if m == "hdd"}

        def on_hdd_only() -> bool:
            return all(d in hdd_disks for e in hdd.record.slabs.values() for d, _ in e)

        victim = next(d for e in hdd.record.slabs.values() for d, _ in e)
        devices[victim].failed = True
        await pool.mark_failed(victim, "test")
        moves = plan_moves(pool, {victim})
        check_moves_fit(pool, moves)
        progress = await Rebuilder(pool, lambda: {hdd.name: hdd}).run(moves, "repair")
        assert progress.state == "done", progress.errors
        assert on_hdd_only()
        await pool.add_disk(MemoryDevice(12 * MiB, path="new-ssd"), "ssd")
        await Rebuilder(pool, lambda: {hdd.name: hdd}).run(plan_rebalance(pool), "rebalance")
        assert on_hdd_only()
        assert await hdd.read(0, hdd.size) == data

    trio.run(scenario)


def test_a_job_is_done_only_once_its_wrap_up_is_done() -> None:
    """`disk remove --wait` polls the state: "done" while the wrap-up (the removed disk's
    commit, label wipe and close) still runs let a `disk add` of the same file find it open."""

    async def scenario() -> None:
        pool, volume, _, _ = await make(MIRROR, disks=4)
        busy = next(d for d in pool.disks if pool.extents_on(d))
        await pool.set_state(busy, "retiring", "test")
        rebuilder = Rebuilder(pool, lambda: volumes_of(volume))
        seen: list[str] = []
        entered, release = trio.Event(), trio.Event()

        async def wrap_up() -> None:
            seen.append(rebuilder.progress.state)
            entered.set()
            await release.wait()

        async def fail_wrap_up() -> None:
            await pool.commit()
            raise NoSpace("test: the wrap-up could not be recorded")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: rebuilder.run(plan_moves(pool, {busy}), "t",
                                                     after=wrap_up))
            await entered.wait()
            assert rebuilder.progress.state == "running"  # what a poller sees meanwhile
            assert not rebuilder.finished.is_set()
            release.set()
        assert seen == ["running"]
        assert rebuilder.progress.state == "done"
        # A wrap-up that fails ends the job as failed, with the reason, never left running.
        progress = await rebuilder.run([], "t2", after=fail_wrap_up)
        assert progress.state == "failed"
        assert any("could not be recorded" in e for e in progress.errors)

    trio.run(scenario)
