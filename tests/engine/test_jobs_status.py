"""Issue 17 items 6 and 8 in-process: the extent jobs of `DiskManager` (cancel, a rate
change, refusal and joining while one runs, resuming an interrupted one), the per-disk error
counters (retried errors counted, kept across close/open, `disk clear`), a tiered volume's
state from its tiers, and `disk remove` of a retired disk wiping both labels and closing the
file."""

import random
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio

from blockspace.admin.manage import DiskManager
from blockspace.admin.pools import pool_status
from blockspace.admin.registry import Registry
from blockspace.cli import main as cli
from blockspace.disks.devices import Device, FileDevice
from blockspace.errors import BlockspaceError, DeviceError, InvalidInput
from blockspace.geometry.layouts import LayoutSpec
from blockspace.ondisk.label import BLOCK, LABEL_SIZE
from blockspace.pool.pool import Pool, read_label
from blockspace.repair.rebuild import MIN_RATE, check_rate
from blockspace.testing.memory_device import MemoryDevice
from blockspace.tiering.admin import create_tiered, parse_tier
from blockspace.volume.volume import Volume

KiB = 1 << 10
MiB = 1 << 20
MIRROR = LayoutSpec("mirror", 1, copies=2, interleave=16 * KiB)


async def make(disks: int = 4, slabs: int = 12) -> tuple[Pool, Volume, list[MemoryDevice], bytes]:
    devices = [MemoryDevice(16 * MiB, path=f"mem{i}") for i in range(disks)]
    pool = await Pool.create("p", devices, media=["hdd"] * disks, slab_size=MiB,
                             meta_slot_size=64 * KiB)
    record = await pool.create_volume("v", slabs * MIRROR.slab_data_size(MiB), MIRROR, "thin")
    volume = Volume(pool, record)
    data = random.Random(17).randbytes(volume.size)
    await volume.write(0, data)
    await pool.flush()
    return pool, volume, devices, data


def manager_for(pool: Pool, volume: Volume, registry: Registry,
                nursery: trio.Nursery) -> DiskManager:
    return DiskManager(pool, lambda: {volume.name: volume}, registry, "p", nursery)


async def wait_for(predicate: Callable[[], bool]) -> None:
    """Poll (the progress counters have no event of their own) for up to 20 s."""
    for _ in range(2000):
        if predicate():
            return
        await trio.sleep(0.01)
    raise AssertionError("timed out waiting for the job")


def busiest(pool: Pool) -> int:
    return max(pool.disks, key=pool.extents_on)


# ---- jobs ------------------------------------------------------------------------------------


def test_a_rate_below_the_minimum_is_refused() -> None:
    assert check_rate(0) == 0
    assert check_rate(MIN_RATE) == MIN_RATE
    for bad in (1, MIN_RATE - 1, -5):
        with pytest.raises(InvalidInput, match="at least 1M"):
            check_rate(bad)


def test_cancel_stops_a_slow_retire_with_the_map_consistent_and_the_disk_saying_what_is_left(
    tmp_path: Path,
) -> None:
    registry = Registry(tmp_path)

    async def scenario() -> None:
        pool, volume, devices, data = await make()
        disk = busiest(pool)
        total = pool.extents_on(disk)
        async with trio.open_nursery() as nursery:
            manager = manager_for(pool, volume, registry, nursery)
            manager.rate_limit = MIN_RATE  # one 1 MiB extent a second
            await manager.retire(str(disk), remove=False)
            assert registry.job_state("p") is not None  # recorded while it runs
            await wait_for(lambda: manager.rebuilder.progress.done >= 1)
            progress = await manager.cancel()
        assert progress["state"] == "cancelled"
        left = pool.extents_on(disk)
        assert 0 < left < total
        record = pool.disks[disk].record
        assert record.state == "retiring"
        assert f"cancelled with {left} extents left" in record.state_reason
        assert registry.job_state("p") is None  # a cancelled job does not resume
        assert not manager.rebuilder.active
        assert await volume.read(0, volume.size) == data
        reopened = await Pool.open(devices)
        assert reopened.extents_on(disk) == left
        assert reopened.disks[disk].record.state_reason == record.state_reason
        assert await Volume(reopened, reopened.volume("v")).read(0, volume.size) == data

    trio.run(scenario)


def test_a_rate_change_applies_to_the_running_job_at_once(tmp_path: Path) -> None:
    async def scenario() -> None:
        pool, volume, _, data = await make()
        disk = busiest(pool)
        async with trio.open_nursery() as nursery:
            manager = manager_for(pool, volume, Registry(tmp_path), nursery)
            manager.rate_limit = MIN_RATE
            await manager.retire(str(disk), remove=False)
            await wait_for(lambda: manager.rebuilder.progress.done >= 1)
            assert pool.extents_on(disk) > 2  # seconds of work left at 1 MiB/s
            started = time.monotonic()
            progress = manager.set_rate(0)  # no limit: the waiting movers go now
            assert progress["rate_limit"] == 0
            with trio.fail_after(10):
                await manager.rebuilder.finished.wait()
            assert time.monotonic() - started < 2.0
        assert manager.rebuilder.progress.state == "done"
        assert pool.disks[disk].record.state == "retired"
        assert await volume.read(0, volume.size) == data
        with pytest.raises(InvalidInput, match="at least 1M"):
            manager.set_rate(1)

    trio.run(scenario)


def test_other_disk_operations_are_refused_while_a_job_runs_and_the_same_one_joins(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        pool, volume, _, _ = await make(disks=5)
        disk = busiest(pool)
        other = next(d for d in pool.disks if d != disk)
        async with trio.open_nursery() as nursery:
            manager = manager_for(pool, volume, Registry(tmp_path), nursery)
            manager.rate_limit = MIN_RATE
            first = await manager.retire(str(disk), remove=False)
            again = await manager.retire(str(disk), remove=False)  # joins, no error
            assert again["reason"] == first["reason"] == f"retire disk {disk}"
            generation = pool.metadata.generation
            for attempt in (manager.retire(str(other), remove=False), manager.repair(),
                            manager.rebalance(), manager.retire(str(disk), remove=True)):
                with pytest.raises(BlockspaceError, match="a rebuild is running .*cancel it"):
                    await attempt
            assert pool.disks[other].record.state == "online"
            assert pool.metadata.generation >= generation
            await manager.cancel()

    trio.run(scenario)


def test_an_interrupted_retire_resumes_from_its_record(tmp_path: Path) -> None:
    """The daemon's stop cancels the job from outside (as a kill would end it): the record
    stays, and the next DiskManager's `resume` finishes the retire."""
    registry = Registry(tmp_path)

    async def scenario() -> None:
        pool, volume, devices, data = await make()
        disk = busiest(pool)
        async with trio.open_nursery() as nursery:
            manager = manager_for(pool, volume, registry, nursery)
            manager.rate_limit = MIN_RATE
            await manager.retire(str(disk), remove=True)
            await wait_for(lambda: manager.rebuilder.progress.done >= 1)
            nursery.cancel_scope.cancel()  # the stop
        job = registry.job_state("p")
        assert job is not None
        assert (job["op"], job["disk"]) == ("remove", disk)
        assert pool.extents_on(disk) > 0
        reopened = await Pool.open(devices)
        revolume = Volume(reopened, reopened.volume("v"))
        async with trio.open_nursery() as nursery:
            manager = manager_for(reopened, revolume, registry, nursery)
            await manager.resume()
            assert manager.rebuilder.progress.reason == f"remove disk {disk}"
            assert manager.rebuilder.progress.rate_limit == MIN_RATE  # as it was
            manager.set_rate(0)
            with trio.fail_after(20):
                await manager.rebuilder.finished.wait()
        assert manager.rebuilder.progress.state == "done"
        assert disk not in reopened.disks
        assert registry.job_state("p") is None
        assert await revolume.read(0, volume.size) == data

    trio.run(scenario)


# ---- error counters ------------------------------------------------------------------------


class Flaky(MemoryDevice):
    """Fails the next `fail_reads` reads, then works: an error a retry takes away."""

    def __init__(self, size: int, path: str) -> None:
        super().__init__(size, path)
        self.fail_reads = 0

    async def read(self, offset: int, length: int) -> bytes:
        if self.fail_reads:
            self.fail_reads -= 1
            raise DeviceError(f"{self.path}: read at {offset}: I/O error")
        return await super().read(offset, length)


def test_error_counters_count_retried_errors_persist_across_open_and_disk_clear_resets(
) -> None:
    async def scenario() -> None:
        devices = [Flaky(16 * MiB, f"mem{i}") for i in range(3)]
        pool = await Pool.create("p", devices, media=["hdd"] * 3, slab_size=MiB,
                                 meta_slot_size=64 * KiB)
        record = await pool.create_volume("v", 4 * MiB, MIRROR, "thin")
        volume = Volume(pool, record)
        await volume.write(0, b"x" * (4 * MiB))
        disk = pool.disks[0]

        async def read(device: Device) -> bytes:
            return await device.read(0, BLOCK)

        devices[0].fail_reads = 2
        await pool.disk_io(disk, "label read", read, attempts=3)  # retried away
        assert disk.errors["read"] == 2
        # A write that fails a disk is counted too.
        devices[1].failed = True
        await volume.write(0, b"y" * (4 * MiB))
        assert pool.disks[1].record.state == "failed"
        writes = pool.disks[1].errors["write"]
        assert writes >= 1
        await pool.commit()
        devices[1].failed = False

        reopened = await Pool.open(devices)
        assert reopened.disks[0].errors == {"read": 2, "write": 0, "checksum": 0}
        assert reopened.disks[1].errors["write"] == writes
        assert pool_status(reopened)["disks"][0]["errors"]["read"] == 2
        await reopened.clear_errors(0)
        assert reopened.disks[0].errors == {"read": 0, "write": 0, "checksum": 0}
        again = await Pool.open(devices)
        assert again.disks[0].errors == {"read": 0, "write": 0, "checksum": 0}
        assert again.disks[1].errors["write"] == writes  # only the disk named

    trio.run(scenario)


def run_cli(state: Path, *args: str) -> int:
    return cli.main(["--state-dir", str(state), *args])


def images(tmp_path: Path, count: int, size: int = 64 * MiB) -> list[Path]:
    paths = []
    for index in range(count):
        path = tmp_path / f"d{index}.img"
        with open(path, "xb") as handle:
            handle.truncate(size)
        paths.append(path)
    return paths


def pool_disk_errors(state: Path, capsys: pytest.CaptureFixture[str]) -> list[dict[str, int]]:
    import json

    capsys.readouterr()
    assert run_cli(state, "--json", "pool", "status", "p") == 0
    return [d["errors"] for d in json.loads(capsys.readouterr().out)["disks"]]


def test_disk_clear_offline_and_its_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = tmp_path / "state"
    disks = images(tmp_path, 2)
    assert run_cli(state, "pool", "create", "p", *map(str, disks), "--slab-size", "4M") == 0

    async def count_errors() -> None:
        with FileDevice(str(disks[1])) as device, FileDevice(str(disks[0])) as first:
            pool = await Pool.open([first, device])
            pool.count_device_error(1, "read")
            pool.count_device_error(1, "write")
            await pool.commit()
            pool.close()

    trio.run(count_errors)
    assert pool_disk_errors(state, capsys)[1] == {"read": 1, "write": 1, "checksum": 0}
    capsys.readouterr()
    assert run_cli(state, "disk", "clear", "p", "99") == 2
    assert "has no disk '99'" in capsys.readouterr().err
    assert run_cli(state, "disk", "clear", "p", "1") == 0
    assert pool_disk_errors(state, capsys)[1] == {"read": 0, "write": 0, "checksum": 0}
    # The rate floor, before anything changes.
    capsys.readouterr()
    assert run_cli(state, "disk", "retire", "p", "0", "--rate", "1") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "at least 1M" in err
    # No interrupted job: nothing to cancel (exit 5).
    assert run_cli(state, "disk", "rebuild", "p", "--cancel") == 5


# ---- status --------------------------------------------------------------------------------


def test_a_tiered_volume_is_as_bad_as_its_worst_tier() -> None:
    async def scenario() -> None:
        media = ["ssd", "ssd", "hdd", "hdd", "hdd"]
        devices = [MemoryDevice(12 * MiB, path=f"mem{i}") for i in range(len(media))]
        pool = await Pool.create("t", devices, media=media, slab_size=MiB,
                                 meta_slot_size=128 * KiB)
        await create_tiered(pool, "v", [parse_tier("ssd:1M:mirror-2"),
                                        parse_tier("hdd:4M:parity-1")],
                            provisioning="fixed", unit=64 * KiB, interleave=16 * KiB)

        def states() -> dict[str, str]:
            return {v["name"]: v["state"] for v in pool_status(pool)["volumes"]}

        assert set(states().values()) == {"online"}
        await pool.mark_failed(2, "test: hdd died")
        assert states()["v"] == "degraded"
        await pool.mark_failed(3, "test: another hdd died")
        found = states()
        hdd_tier = pool.volume("v").tiers
        assert hdd_tier is not None
        assert found[hdd_tier.hdd] == "failed"
        assert found[hdd_tier.ssd] == "online"
        assert found["v"] == "failed"
        assert pool_status(pool)["health"] == "failed"

    trio.run(scenario)


def test_a_thin_volume_is_as_bad_as_the_slabs_it_could_still_place() -> None:
    """Unmapped space of a thin volume is a promise of slabs: with too few disks left to
    place one (even degraded), its writes fail, so it is not "online" (an empty thin volume
    on a pool whose disks had died was shown online)."""

    async def scenario() -> None:
        parity = LayoutSpec("parity", 2, parity=1, interleave=16 * KiB)  # 3 wide, 1 may go
        devices = [MemoryDevice(16 * MiB, path=f"mem{i}") for i in range(4)]
        pool = await Pool.create("p", devices, media=["hdd"] * 4, slab_size=MiB,
                                 meta_slot_size=64 * KiB)
        record = await pool.create_volume("v", 4 * parity.slab_data_size(MiB), parity, "thin")
        await pool.create_volume("empty", 4 * parity.slab_data_size(MiB), parity, "thin")
        volume = Volume(pool, record)

        def states() -> dict[str, str]:
            return {v["name"]: v["state"] for v in pool_status(pool)["volumes"]}

        assert states() == {"v": "online", "empty": "online"}
        await volume.write(0, b"a" * 4096)  # one slab mapped, three still unmapped
        mapped = {d for d, _ in next(iter(pool.volume("v").slabs.values()))}
        (spare,) = {0, 1, 2, 3} - mapped
        await pool.mark_failed(spare, "test: the disk no slab uses died")
        assert states() == {"v": "online", "empty": "online"}  # 3 disks: whole new slabs
        first, second, _ = sorted(mapped)
        await pool.mark_failed(first, "test: died")
        assert states() == {"v": "degraded", "empty": "degraded"}  # new slabs lack a column
        await pool.mark_failed(second, "test: died")
        # One disk left: the mapped slab has lost two columns, and no new slab can be placed.
        assert states() == {"v": "failed", "empty": "failed"}
        with pytest.raises(BlockspaceError):
            await Volume(pool, pool.volume("empty")).write(0, b"b" * 4096)
        assert pool_status(pool)["health"] == "failed"

    trio.run(scenario)


# ---- disk remove ---------------------------------------------------------------------------


def test_remove_of_a_retired_disk_wipes_both_labels_closes_it_and_it_can_be_added_again(
    tmp_path: Path,
) -> None:
    paths = images(tmp_path, 3, 24 * MiB)
    registry = Registry(tmp_path / "state")

    async def scenario() -> None:
        devices = [FileDevice(str(p)) for p in paths]
        pool = await Pool.create("p", devices, media=["hdd"] * 3, slab_size=MiB,
                                 meta_slot_size=64 * KiB)
        record = await pool.create_volume("v", 4 * MiB, MIRROR, "thin")
        volume = Volume(pool, record)
        data = random.Random(5).randbytes(volume.size)
        await volume.write(0, data)
        disk = busiest(pool)
        async with trio.open_nursery() as nursery:
            manager = manager_for(pool, volume, registry, nursery)

            async def job(start: Awaitable[object]) -> None:
                await start
                await manager.rebuilder.finished.wait()
                assert manager.rebuilder.progress.state == "done"

            await job(manager.retire(str(disk), remove=False))
            assert pool.disks[disk].record.state == "retired"
            assert pool.disks[disk].device is None  # out of service, kept open
            await job(manager.retire(str(disk), remove=True))
            assert disk not in pool.disks
            raw = paths[disk].read_bytes()
            assert raw[:LABEL_SIZE] == bytes(LABEL_SIZE)
            assert raw[-LABEL_SIZE:] == bytes(LABEL_SIZE)
            with FileDevice(str(paths[disk])) as reopened:  # closed: no lock left on it
                assert read_label(reopened) is None
            added = await manager.add([str(paths[disk])], "hdd", False)
            assert len(added) == 1
        assert await volume.read(0, volume.size) == data
        pool.close()
        for device in devices:
            device.close()

    trio.run(scenario)
