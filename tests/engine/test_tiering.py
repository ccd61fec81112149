"""Tiered volumes in-process on memory disks: data always matches a bytearray model through
writes, reads, promotions, demotions and destages (also racing each other), placement by
media, pins, a full ssd tier, and crashes at any point of a move."""

import random
import time
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from blockspace.errors import InvalidInput, NoSpace
from blockspace.pool.pool import Pool
from blockspace.testing.memory_device import MemoryDevice
from blockspace.tiering import optimizer as tier_optimizer
from blockspace.tiering import tiered_volume as tiering
from blockspace.tiering.admin import (
    check_growable,
    create_tiered,
    delete_volume,
    load_heat,
    parse_tier,
    pin,
    save_heat,
    unpin,
    volume_status,
)
from blockspace.tiering.heat import HeatMap
from blockspace.tiering.optimizer import SETTLE, TierOptimizer
from blockspace.tiering.tiered_volume import TieredVolume
from blockspace.volume.volume import Volume

KiB = 1 << 10
MiB = 1 << 20
UNIT = 64 * KiB
MEDIA = ["ssd", "ssd", "hdd", "hdd", "hdd"]


async def make_pool(disks: list[MemoryDevice] | None = None) -> tuple[Pool, list[MemoryDevice]]:
    devices = disks or [MemoryDevice(12 * MiB, path=f"mem{i}") for i in range(len(MEDIA))]
    if disks is None:
        pool = await Pool.create("t", devices, media=MEDIA, slab_size=1 * MiB,
                                 meta_slot_size=128 * KiB)
    else:
        pool = await Pool.open(devices)
    return pool, devices


def serve(pool: Pool, name: str = "v") -> TieredVolume:
    record = pool.metadata.volume(name)
    assert record.tiers is not None
    ssd = Volume(pool, pool.metadata.volume(record.tiers.ssd))
    hdd = Volume(pool, pool.metadata.volume(record.tiers.hdd))
    return TieredVolume(pool, record, ssd, hdd)


async def tiered(hdd: str = "hdd:6M:parity-1", ssd: str = "ssd:1M:mirror-2") -> tuple[
    Pool, TieredVolume, list[MemoryDevice]
]:
    pool, devices = await make_pool()
    await create_tiered(pool, "v", [parse_tier(ssd), parse_tier(hdd)], unit=UNIT,
                        interleave=16 * KiB)
    return pool, serve(pool), devices


async def random_io(volume: TieredVolume, model: bytearray, rng: random.Random, n: int) -> None:
    for _ in range(n):
        offset = rng.randrange(volume.size)
        length = min(rng.randrange(1, 200 * KiB), volume.size - offset)
        if rng.random() < 0.6:
            data = rng.randbytes(length)
            await volume.write(offset, data)
            model[offset : offset + length] = data
        else:
            assert await volume.read(offset, length) == model[offset : offset + length]


def check_placement(pool: Pool) -> None:
    for record in pool.metadata.volumes:
        if record.tiers is None:
            continue
        for media in ("ssd", "hdd"):
            sub = pool.metadata.volume(getattr(record.tiers, media))
            for extents in sub.slabs.values():
                assert {pool.disks[d].record.media for d, _ in extents} == {media}


@pytest.mark.parametrize("hdd", ["hdd:6M:parity-1", "hdd:6M:mirror-2", "hdd:6M:simple"])
def test_model_through_moves_and_reopen(hdd: str) -> None:
    async def scenario() -> None:
        pool, volume, devices = await tiered(hdd)
        assert volume.write_back == hdd.endswith("parity-1")
        optimizer = TierOptimizer(volume, rate=0)
        model = bytearray(volume.size)
        rng = random.Random(hdd)
        for _ in range(4):
            await random_io(volume, model, rng, 25)
            for _ in range(300):  # make a few units hot
                unit = rng.choice([3, 7, 11, 60, 90])
                await volume.read(unit * UNIT + rng.randrange(UNIT - 4096), 4096)
            await optimizer.optimize()
            assert await volume.read(0, volume.size) == model
        assert {3, 7, 11, 60, 90} <= set(volume.map)
        assert volume.counters.promotions > 0
        if volume.write_back:
            assert volume.counters.write_allocations > 0
            assert volume.counters.destages > 0
            assert not volume.dirty_units()  # the pass destaged everything
        check_placement(pool)
        reopened, _ = await make_pool(devices)
        again = serve(reopened)
        assert again.map == volume.map
        assert await again.read(0, again.size) == model

    trio.run(scenario)


def test_foreground_io_racing_moves_stays_correct() -> None:
    async def scenario() -> None:
        pool, volume, devices = await tiered()
        for device in devices:
            device.delay = 0.0005  # interleave everything
        model = bytearray(volume.size)
        optimizer = TierOptimizer(volume, rate=0)
        region = volume.size // 4

        async def worker(index: int) -> None:
            rng = random.Random(index)
            base = index * region
            for _ in range(20):
                offset = base + rng.randrange(region - 8192)
                length = rng.randrange(1, 3 * UNIT)
                length = min(length, base + region - offset)
                data = rng.randbytes(length)
                await volume.write(offset, data)
                model[offset : offset + length] = data
                probe = base + rng.randrange(region - 4096)
                assert await volume.read(probe, 4096) == model[probe : probe + 4096]
                await volume.read(base + (index + 1) * UNIT, 4096)  # keep a unit hot

        done = trio.Event()

        async def mover() -> None:
            while not done.is_set():  # moves for as long as the workers write
                await optimizer.optimize()
                for unit in list(volume.map)[:3]:
                    await volume.demote(unit)
                await trio.sleep(0.005)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(mover)
            async with trio.open_nursery() as workers:
                for index in range(4):
                    workers.start_soon(worker, index)
            done.set()
        assert volume.counters.promotions + volume.counters.demotions > 5
        assert await volume.read(0, volume.size) == model

    trio.run(scenario)


@pytest.mark.parametrize("seed", range(6))
def test_crash_at_any_point_of_a_move(seed: int) -> None:
    """Stop the world after a random number of scheduler steps into a pass of moves, then
    reopen from the disks: every acknowledged byte is there, the map points at good data."""

    async def scenario() -> None:
        pool, volume, devices = await tiered()
        model = bytearray(volume.size)
        rng = random.Random(seed)
        await random_io(volume, model, rng, 30)
        for _ in range(200):
            await volume.read(rng.choice([1, 5, 9, 33, 70]) * UNIT, 4096)
        optimizer = TierOptimizer(volume, rate=0)
        steps = rng.randrange(5, 900)
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(optimizer.optimize)
                for _ in range(steps):
                    await trio.lowlevel.checkpoint()
                scope.cancel()
        reopened, _ = await make_pool(devices)
        again = serve(reopened)
        assert await again.read(0, again.size) == model
        # and it keeps working: the next pass completes and the data is still right
        await TierOptimizer(again, rate=0).optimize()
        assert await again.read(0, again.size) == model

    trio.run(scenario)


def test_full_ssd_tier_writes_still_succeed() -> None:
    async def scenario() -> None:
        pool, volume, _ = await tiered()
        model = bytearray(volume.size)
        rng = random.Random(3)
        for unit in range(volume.units):  # far more dirty units than the tier holds
            data = rng.randbytes(UNIT)
            await volume.write(unit * UNIT, data)
            model[unit * UNIT : (unit + 1) * UNIT] = data
        assert volume.free_slots() == 0
        assert volume.counters.writes_bypassed > 0
        assert await volume.read(0, volume.size) == model

    trio.run(scenario)


def test_pins() -> None:
    async def scenario() -> None:
        pool, volume, _ = await tiered()
        optimizer = TierOptimizer(volume, rate=0)
        await volume.write(0, b"x" * volume.size)
        await optimizer.optimize()
        generation = pool.metadata.generation
        with pytest.raises(NoSpace):
            await pin(pool, "v", 0, 2 * MiB, "ssd")  # the ssd tier holds 1M
        with pytest.raises(InvalidInput):
            await pin(pool, "v", 100, 4096, "ssd")
        assert pool.metadata.generation == generation
        await pin(pool, "v", 4 * MiB, 4 * UNIT, "ssd")
        await pin(pool, "v", 0, 1 * MiB, "hdd")
        with pytest.raises(InvalidInput, match="overlaps"):
            await pin(pool, "v", 0, 4096, "ssd")
        for _ in range(50):
            await volume.read(0, 4096)  # hot, but pinned to hdd
        await optimizer.optimize()
        pinned = set(range(4 * MiB // UNIT, 4 * MiB // UNIT + 4))
        assert pinned <= set(volume.map)
        assert not any(u < 1 * MiB // UNIT for u in volume.map)
        status = volume_status(pool, volume.record, volume.heat)
        assert [p["tier"] for p in status["pins"]] == ["hdd", "ssd"]
        assert await unpin(pool, "v") == 2
        assert volume.tiers.pins == []

    trio.run(scenario)


def test_create_errors_change_nothing_and_delete_frees_everything() -> None:
    async def scenario() -> None:
        pool, _ = await make_pool()
        generation = pool.metadata.generation
        bad = [
            [parse_tier("ssd:1M:mirror-3"), parse_tier("hdd:4M:mirror-2")],  # 2 ssd disks
            [parse_tier("ssd:1M:mirror-2"), parse_tier("hdd:4M:parity-2")],  # 3 hdd disks
            [parse_tier("ssd:1M:mirror-2")],
            [parse_tier("ssd:64M:mirror-2"), parse_tier("hdd:4M:mirror-2")],  # no room
        ]
        for tiers in bad:
            with pytest.raises((InvalidInput, NoSpace)):
                await create_tiered(pool, "v", tiers)
        with pytest.raises(InvalidInput, match="stripes"):
            await create_tiered(pool, "v", [parse_tier("ssd:1M:mirror-2"),
                                            parse_tier("hdd:4M:parity-1")], unit=48 * KiB)
        for text in ("ssd:1G", "nvme:1G:mirror-2", "ssd:0:mirror-2", "ssd:1G:mirror-4",
                     "ssd:1G:raid5", "ssd:1G:simple-2"):
            with pytest.raises(InvalidInput):
                parse_tier(text)
        assert pool.metadata.generation == generation
        assert pool.metadata.volumes == []
        await create_tiered(pool, "v", [parse_tier("ssd:1M:mirror-2"),
                                        parse_tier("hdd:4M:parity-1")], provisioning="fixed")
        check_placement(pool)
        assert any(pool.extents_on(d) for d in pool.disks)
        with pytest.raises(InvalidInput, match="tier of tiered volume"):
            await delete_volume(pool, "v.ssd")
        with pytest.raises(InvalidInput):
            check_growable(pool, "v")
        await delete_volume(pool, "v")
        assert pool.metadata.volumes == []
        assert not any(pool.extents_on(d) for d in pool.disks)
        assert sum(pool.allocator.free_map().values()) == sum(
            d.record.extent_count for d in pool.disks.values())

    trio.run(scenario)


def test_heat_survives_a_restart(tmp_path: Path) -> None:
    async def scenario() -> None:
        pool, volume, _ = await tiered()
        for _ in range(20):
            await volume.read(5 * UNIT, 4096)
        path = tmp_path / "heat.json"
        save_heat(path, volume.heat)
        fresh = HeatMap(volume.units)
        assert load_heat(path, fresh)
        assert fresh.heat(5) == pytest.approx(20.0, rel=0.01)
        path.write_text("{not json")
        assert not load_heat(path, HeatMap(volume.units))
        assert not load_heat(tmp_path / "missing.json", HeatMap(volume.units))

    trio.run(scenario)


def test_optimizer_rate_limit_schedule_and_no_ping_pong() -> None:
    async def scenario() -> None:
        pool, volume, _ = await tiered("hdd:6M:mirror-2")
        for unit in range(40):
            for _ in range(unit % 7 + 2):
                await volume.read(unit * UNIT, 4096)
        rate = 16 * UNIT  # bytes per second: 16 moves a second at most
        saved: list[float] = []
        optimizer = TierOptimizer(volume, rate=rate, interval=150.0,
                                  save_heat=lambda v: saved.append(trio.current_time()))
        start = trio.current_time()
        report = await optimizer.optimize()
        moves = report.promoted + report.demoted
        assert moves >= 16
        assert trio.current_time() - start >= (moves - 1) * UNIT / rate
        again = await optimizer.optimize()  # same heat: nothing to undo
        assert again.promoted + again.demoted == 0
        saved.clear()
        async with trio.open_nursery() as nursery:  # the schedule
            begin = trio.current_time()
            nursery.start_soon(optimizer.run)
            await trio.sleep(310)
            assert optimizer.passes == 4  # 2 above, then at 150 s and 300 s
            nursery.cancel_scope.cancel()
        # heat saved at 60, 120, (150: the pass), 210, 270, (300: the pass)
        assert [round(t - begin) for t in saved] == [60, 120, 150, 210, 270, 300]

    trio.run(scenario, clock=trio.testing.MockClock(autojump_threshold=0))


class _TrioTime:
    """`time` for the tier modules with `monotonic` on trio's clock, so a MockClock also
    moves the last-write times the destager's settle delay is measured against."""

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    @staticmethod
    def monotonic() -> float:
        return trio.current_time()


def test_destager_cleans_dirty_units_once_they_settle(monkeypatch: pytest.MonkeyPatch) -> None:
    """Written units stay dirty on the ssd tier until not written for SETTLE seconds, each
    counted from its own last write, then the background destager sends them home."""
    for module in (tiering, tier_optimizer):
        monkeypatch.setattr(module, "time", _TrioTime())

    async def scenario() -> None:
        pool, volume, _ = await tiered()
        optimizer = TierOptimizer(volume, rate=0)
        data = bytearray(random.Random(9).randbytes(3 * UNIT))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(optimizer.run_destager)
            begin = trio.current_time()
            await volume.write(5 * UNIT, data)
            assert volume.dirty_units() == [5, 6, 7]
            await trio.sleep_until(begin + 0.6 * SETTLE)
            assert volume.dirty_units() == [5, 6, 7]  # none settled yet
            again = random.Random(10).randbytes(4096)
            await volume.write(6 * UNIT, again)  # unit 6 starts settling again
            data[UNIT : UNIT + 4096] = again
            await trio.sleep_until(begin + 1.2 * SETTLE)
            assert volume.dirty_units() == [6]
            assert volume.counters.destages == 2
            await trio.sleep_until(begin + 3 * SETTLE)
            nursery.cancel_scope.cancel()
        assert volume.dirty_units() == []
        assert volume.counters.destages == 3
        assert await volume.hdd.read(5 * UNIT, 3 * UNIT) == data  # the home is current

    trio.run(scenario, clock=trio.testing.MockClock(autojump_threshold=0))


def test_a_tier_unit_whose_map_the_metadata_area_cannot_hold_is_refused() -> None:
    """The metadata area is sized for tier maps of the ssd capacity in default (1 MiB)
    units; a smaller unit needs more slots, and a tiered volume whose map could outgrow
    the area is refused up front (before, it was made, and a map grown past the area would
    have failed its commits with ENOSPC). One that fits is made."""

    async def scenario() -> None:
        devices = [MemoryDevice(256 * MiB, path=f"mem{i}") for i in range(len(MEDIA))]
        pool = await Pool.create("t", devices, media=MEDIA, slab_size=1 * MiB,
                                 meta_slot_size=128 * KiB)
        with pytest.raises(InvalidInput, match="use a larger --tier-unit"):
            await create_tiered(pool, "small", [parse_tier("ssd:200M:mirror-2"),
                                                parse_tier("hdd:300M:mirror-2")], unit=4 * KiB)
        assert [v.name for v in pool.metadata.volumes] == []
        await create_tiered(pool, "v", [parse_tier("ssd:200M:mirror-2"),
                                        parse_tier("hdd:300M:mirror-2")])
        assert pool.metadata.volume("v").tiers is not None

    trio.run(scenario)
