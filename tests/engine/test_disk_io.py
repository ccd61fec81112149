"""`Pool.disk_io`, the one bound every device call goes through (the volume's extent I/O,
metadata and intent writes, flushes, zeroing, the watchdog's probes): retries of a
transient error, the I/O timeout, failing a disk that does not answer, shielding from the
caller's cancellation, and the device it runs on."""

from collections.abc import Awaitable, Callable

import pytest
import trio
import trio.testing

from blockspace.disks.devices import Device
from blockspace.errors import DeviceError
from blockspace.geometry.layouts import LayoutSpec
from blockspace.pool.pool import Pool
from blockspace.testing.memory_device import MemoryDevice

MiB = 1 << 20


async def make() -> tuple[Pool, list[MemoryDevice]]:
    devices = [MemoryDevice(12 * MiB, path=f"mem{i}") for i in range(2)]
    pool = await Pool.create("io", devices, media=["hdd"] * 2, slab_size=MiB,
                             meta_slot_size=64 << 10)
    await pool.create_volume("v", MiB, LayoutSpec("mirror", 1, copies=2), "thin")
    pool.io_timeout = 5.0
    return pool, devices


def test_a_transient_error_is_retried_until_the_attempts_are_spent() -> None:
    async def scenario() -> None:
        pool, _ = await make()
        disk = pool.disks[0]
        calls: list[Device] = []

        def failing(times: int) -> Callable[[Device], Awaitable[str]]:
            async def op(device: Device) -> str:
                calls.append(device)
                if len(calls) <= times:
                    raise DeviceError("EIO")
                return "done"
            return op

        assert await pool.disk_io(disk, "read", failing(2), attempts=3) == "done"
        assert len(calls) == 3
        assert all(device is disk.device for device in calls)
        calls.clear()
        with pytest.raises(DeviceError, match="EIO"):
            await pool.disk_io(disk, "read", failing(5), attempts=3)
        assert len(calls) == 3
        calls.clear()
        with pytest.raises(DeviceError, match="EIO"):  # by default: once, no retry
            await pool.disk_io(disk, "read", failing(1))
        assert len(calls) == 1
        assert disk.record.state == "online"  # an error is the caller's to judge

    trio.run(scenario, clock=trio.testing.MockClock(autojump_threshold=0))


def test_no_answer_in_time_raises_at_once_and_fails_the_disk_only_when_asked() -> None:
    async def scenario() -> None:
        pool, devices = await make()

        async def hang(device: Device) -> None:
            await trio.sleep(3600)

        started = trio.current_time()
        with pytest.raises(DeviceError, match=r"^no answer to a probe within 5s$"):
            await pool.disk_io(pool.disks[0], "probe", hang, attempts=3)
        assert trio.current_time() - started == 5.0  # one timeout, not one per attempt
        assert pool.disks[0].record.state == "online"

        generation = pool.metadata.generation
        with pytest.raises(DeviceError, match=r"^disk 1: no answer to a write within 5s$"):
            await pool.disk_io(pool.disks[1], "write", hang, attempts=3, fail_on_timeout=True)
        assert pool.disks[1].record.state == "failed"
        assert pool.disks[1].record.state_reason == "no answer to a write within 5s"
        assert pool.metadata.generation > generation  # committed before the error came
        reopened = await Pool.open(devices[:1])  # what the surviving disk holds
        assert reopened.disks[1].record.state == "failed"

    trio.run(scenario, clock=trio.testing.MockClock(autojump_threshold=0))


def test_a_shielded_call_finishes_though_its_caller_is_cancelled() -> None:
    async def scenario() -> None:
        pool, _ = await make()
        finished: list[bool] = []

        async def slow(device: Device) -> None:
            await trio.sleep(1.0)
            finished.append(True)

        for shield in (True, False):
            finished.clear()
            with trio.move_on_after(0.1):
                await pool.disk_io(pool.disks[0], "write", slow, shield=shield)
            assert finished == ([True] if shield else [])
        assert pool.disks[0].record.state == "online"

    trio.run(scenario, clock=trio.testing.MockClock(autojump_threshold=0))


def test_it_runs_on_the_device_given_else_on_the_disks_own_while_in_service() -> None:
    async def scenario() -> None:
        pool, devices = await make()
        used: list[Device] = []

        async def op(device: Device) -> None:
            used.append(device)

        await pool.disk_io(pool.disks[0], "read", op)
        await pool.set_state(0, "failed", "for the test")
        with pytest.raises(DeviceError, match="disk 0 is out of service"):
            await pool.disk_io(pool.disks[0], "read", op)
        await pool.disk_io(pool.disks[0], "read", op, device=devices[0])  # as looked up before
        assert used == [devices[0], devices[0]]

    trio.run(scenario)


def test_device_errors_are_counted_per_disk_and_kind() -> None:
    async def scenario() -> None:
        pool, _ = await make()
        pool.count_device_error(1, "read")
        pool.count_device_error(1, "write")
        pool.count_device_error(1, "write")
        assert pool.disks[1].errors == {"read": 1, "write": 2, "checksum": 0}
        assert pool.disks[0].errors == {"read": 0, "write": 0, "checksum": 0}

    trio.run(scenario)
