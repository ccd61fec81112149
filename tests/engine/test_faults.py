"""The fault-injection layer: FaultyDevice over MemoryDevice (every fault kind, on trio's
MockClock where time matters), the CLI's value parsing, and one real mount driven through
`blockspace fault`."""

from __future__ import annotations

import errno
import os
import random
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from blockspace.cli import main as cli
from blockspace.cli.faults import (
    parse_bandwidth,
    parse_duration,
    parse_flakey,
    parse_percent,
    parse_range,
    parse_seed,
    spec_from_args,
)
from blockspace.disks.faults import FaultSpec, FaultyDevice, FaultyDeviceStats
from blockspace.errors import BlockspaceError, DeviceError, InvalidInput
from blockspace.geometry.layouts import LayoutSpec
from blockspace.pool.pool import Pool
from blockspace.service.fault_requests import DISABLED_MESSAGE, handle_fault_request
from blockspace.testing.memory_device import MemoryDevice
from blockspace.volume.volume import Volume

KiB = 1 << 10
MiB = 1 << 20
SIZE = 4 * MiB


def run(fn: Callable[[], Awaitable[Any]]) -> Any:
    """Run on a mock clock that jumps ahead whenever every task sleeps."""
    return trio.run(fn, clock=trio.testing.MockClock(autojump_threshold=0))


def faulty(spec: FaultSpec | None = None) -> tuple[FaultyDevice, MemoryDevice]:
    inner = MemoryDevice(SIZE, path="/dev/mem0")
    inner.data[:] = random.Random(1).randbytes(SIZE)
    return FaultyDevice(inner, spec), inner


def assert_injected(error: DeviceError, words: str) -> None:
    assert error.os_errno == errno.EIO  # type: ignore[attr-defined]
    assert "/dev/mem0" in str(error)
    assert "injected fault" in str(error)
    assert words in str(error)


# ---- pass-through -----------------------------------------------------------------------------


def test_no_faults_is_a_transparent_wrapper() -> None:
    device, inner = faulty()
    assert (device.path, device.size) == (inner.path, inner.size)

    async def main() -> None:
        await device.write(4096, b"x" * 4096)
        assert await device.read(4096, 4096) == b"x" * 4096
        buf = bytearray(10)
        await device.readinto(4096, buf)
        assert buf == b"x" * 10
        await device.flush()
        await device.zero(4096, 4096)
        assert await device.read(4096, 4096) == bytes(4096)

    run(main)
    device.write_sync(0, b"abc")
    assert device.read_sync(0, 3) == b"abc" == bytes(inner.data[:3])
    device.flush_sync()
    stats = device.statistics()
    assert isinstance(stats, FaultyDeviceStats)
    assert stats.reads == inner.statistics().reads == 4
    assert stats.writes == 2
    assert stats.flushes == 2
    assert stats.errors == 0
    assert device.fault_state()["spec"] is None


def test_out_of_range_and_closed_are_refused_by_the_usual_checks() -> None:
    device, inner = faulty(FaultSpec(read_error=1.0))
    with pytest.raises(DeviceError) as caught:
        device.read_sync(SIZE - 10, 20)
    assert "outside the device" in str(caught.value)
    assert device.statistics().injected_read_errors == 0
    device.close()
    assert inner.closed
    assert device.closed
    with pytest.raises(DeviceError) as caught:
        device.read_sync(0, 1)
    assert caught.value.os_errno == errno.EBADF  # type: ignore[attr-defined]


# ---- errors -------------------------------------------------------------------------------------


def test_dead_fails_every_request_until_cleared() -> None:
    device, inner = faulty(FaultSpec(dead=True))
    before = bytes(inner.data[:4096])

    async def main() -> None:
        for op in (
            lambda: device.read(0, 4096),
            lambda: device.readinto(0, bytearray(4096)),
            lambda: device.write(0, b"y" * 4096),
            lambda: device.zero(0, 4096),
            device.flush,
        ):
            with pytest.raises(DeviceError) as caught:
                await op()
            assert_injected(caught.value, "dead disk")

    run(main)
    for call in (
        lambda: device.read_sync(0, 1),
        lambda: device.write_sync(0, b"y"),
        lambda: device.zero_sync(0, 1),
        device.flush_sync,
    ):
        with pytest.raises(DeviceError):
            call()
    assert bytes(inner.data[:4096]) == before  # nothing reached the disk
    stats = device.statistics()
    assert (stats.injected_read_errors, stats.injected_write_errors,
            stats.injected_flush_errors) == (3, 4, 2)
    assert stats.errors == 9
    assert stats.reads == stats.writes == 0

    device.clear()
    device.write_sync(0, b"back")
    assert device.read_sync(0, 4) == b"back"


def test_read_and_write_errors_always() -> None:
    device, inner = faulty(FaultSpec(read_error=1.0))
    with pytest.raises(DeviceError) as caught:
        device.read_sync(0, 512)
    assert_injected(caught.value, "read error")
    device.write_sync(0, b"w")  # writes are fine
    assert inner.data[0:1] == b"w"

    device.set_spec(FaultSpec(write_error=1.0))
    assert device.read_sync(0, 1) == b"w"
    for call in (lambda: device.write_sync(0, b"z"), lambda: device.zero_sync(0, 4096)):
        with pytest.raises(DeviceError) as caught:
            call()
        assert_injected(caught.value, "write error")
    assert inner.data[0:1] == b"w"
    device.flush_sync()  # flushes are not writes


def _failures(spec: FaultSpec, count: int = 2000) -> list[int]:
    device, _ = faulty(spec)
    failed = []
    for i in range(count):
        try:
            device.read_sync((i * 4096) % SIZE, 4096)
        except DeviceError:
            failed.append(i)
    return failed


def test_error_probability_is_seeded_and_reproducible() -> None:
    first = _failures(FaultSpec(read_error=0.1, seed=42))
    assert 140 <= len(first) <= 260  # 10% of 2000, give or take
    assert _failures(FaultSpec(read_error=0.1, seed=42)) == first
    assert _failures(FaultSpec(read_error=0.1, seed=43)) != first
    assert len(_failures(FaultSpec(read_error=0.005, seed=1))) < 30
    # No seed: a random one is picked and reported, and it reproduces the run.
    device, _ = faulty(FaultSpec(read_error=0.1))
    assert _failures(FaultSpec(read_error=0.1, seed=device.seed)) == _failures(
        FaultSpec(read_error=0.1, seed=device.seed)
    )
    assert device.fault_state()["seed"] == device.seed


def test_errors_only_in_ranges() -> None:
    bad = ((64 * KiB, 4 * KiB), (1 * MiB, 1))
    device, inner = faulty(FaultSpec(read_error=1.0, write_error=1.0, ranges=bad))
    assert device.read_sync(0, 64 * KiB) == bytes(inner.data[: 64 * KiB])  # ends right before
    assert len(device.read_sync(68 * KiB, 4 * KiB)) == 4 * KiB  # starts right after
    for offset, length in ((64 * KiB, 1), (60 * KiB, 8 * KiB), (68 * KiB - 1, 1), (1 * MiB, 1)):
        with pytest.raises(DeviceError) as caught:
            device.read_sync(offset, length)
        assert_injected(caught.value, "bad range")
        with pytest.raises(DeviceError):
            device.write_sync(offset, b"q" * length)
    device.write_sync(2 * MiB, b"ok")
    device.flush_sync()

    reads_only = FaultSpec(read_error=1.0, ranges=((0, 4096),))
    device.set_spec(reads_only)
    device.write_sync(0, b"remapped")  # like a drive remapping a bad sector on write
    with pytest.raises(DeviceError):
        device.read_sync(0, 8)


# ---- time: latency, bandwidth, flakey ---------------------------------------------------------


def test_latency_and_jitter_on_the_mock_clock() -> None:
    device, _ = faulty(FaultSpec(latency=0.020))

    async def timed(op: Callable[[], Awaitable[Any]]) -> float:
        start = trio.current_time()
        await op()
        return trio.current_time() - start

    async def main() -> None:
        assert await timed(lambda: device.read(0, 4096)) == pytest.approx(0.020)
        assert await timed(lambda: device.write(0, b"x")) == pytest.approx(0.020)
        assert await timed(device.flush) == pytest.approx(0.020)
        # Concurrent requests are delayed side by side, not one after the other.
        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            for i in range(10):
                nursery.start_soon(device.read, i * 4096, 4096)
        assert trio.current_time() - start == pytest.approx(0.020)

        device.set_spec(FaultSpec(latency=0.020, jitter=0.005, seed=7))
        delays = [await timed(lambda: device.read(0, 512)) for _ in range(200)]
        assert all(0.015 - 1e-9 <= d <= 0.025 + 1e-9 for d in delays)
        assert max(delays) - min(delays) > 0.008  # it really varies
        assert sum(delays) / len(delays) == pytest.approx(0.020, abs=0.001)

    run(main)
    stats = device.statistics()
    assert stats.delayed_requests == 3 + 10 + 200
    # The blocking calls never sleep, even on a slow disk.
    device.read_sync(0, 1)


def test_clearing_frees_requests_stuck_on_a_stalled_disk() -> None:
    device, _ = faulty(FaultSpec(latency=600))  # a disk that stopped answering

    async def main() -> None:
        done: list[float] = []

        async def read() -> None:
            await device.read(0, 4096)
            done.append(trio.current_time())

        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(read)
            await trio.sleep(2)
            assert done == []
            device.clear()
        assert done == [2, 2, 2]

        device.set_spec(FaultSpec(bandwidth=1024))  # 1 KiB/s: a 1 MiB read waits ~17 min
        failed: list[float] = []

        async def big_read() -> None:
            with pytest.raises(DeviceError):
                await device.read(0, MiB)
            failed.append(trio.current_time())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(big_read)
            await trio.sleep(1)
            device.set_spec(FaultSpec(read_error=1.0))
        assert failed == [3]  # it went on at once, under the new faults

    run(main)


def test_bandwidth_cap_on_the_mock_clock() -> None:
    device, _ = faulty(FaultSpec(bandwidth=1 * MiB))  # 1 MiB/s, 100 ms of burst

    async def main() -> None:
        start = trio.current_time()
        for i in range(4):
            await device.write(i * MiB, bytes(MiB))
        elapsed = trio.current_time() - start
        assert elapsed == pytest.approx(3.9, abs=0.01)

        # Concurrent readers share the same bucket: 2 MiB take 2 s whoever asks.
        await trio.sleep(1)  # refill the burst
        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            for i in range(8):
                nursery.start_soon(device.read, i * 256 * KiB, 256 * KiB)
        assert trio.current_time() - start == pytest.approx(1.9, abs=0.01)

        # Small requests inside the burst are not delayed.
        await trio.sleep(1)
        start = trio.current_time()
        await device.read(0, 4096)
        assert trio.current_time() - start == 0

    run(main)
    # Summed over requests: the concurrent readers waited 0.15 + 0.4 + ... + 1.9 s.
    assert device.statistics().throttle_seconds == pytest.approx(3.9 + 8.2, abs=0.01)


def test_flakey_up_down_cycle_fails_everything_while_down() -> None:
    async def main() -> None:
        device, _ = faulty(FaultSpec(flakey_up=5, flakey_down=1))
        phases = []
        for t in (0.0, 4.9, 5.1, 5.9, 6.1, 10.9, 11.5, 12.2):
            await trio.sleep_until(t)
            try:
                await device.read(0, 512)
                phases.append("up")
            except DeviceError as error:
                assert_injected(error, "flakey")
                phases.append("down")
            assert device.fault_state()["flakey_phase"] == phases[-1]
        assert phases == ["up", "up", "down", "down", "up", "up", "down", "up"]
        # while down, the sync calls fail too
        await trio.sleep_until(17.5)
        with pytest.raises(DeviceError):
            device.write_sync(0, b"x")
        with pytest.raises(DeviceError):
            await device.flush()

    run(main)


def test_flakey_drop_writes_loses_writes_while_down_only() -> None:
    async def main() -> None:
        device, inner = faulty(FaultSpec(flakey_up=2, flakey_down=2, drop_writes=True))
        await device.write(0, b"kept")  # up
        await trio.sleep_until(3)  # down
        await device.write(4096, b"lost")  # reported done ...
        await device.zero(0, 4)
        device.write_sync(8192, b"gone")
        assert await device.read(0, 4) == b"kept"  # reads still work while down
        await device.flush()
        assert bytes(inner.data[4096:4100]) != b"lost"  # ... but never reached the disk
        assert bytes(inner.data[8192:8196]) != b"gone"
        await trio.sleep_until(4.5)  # up again
        await device.write(4096, b"good")
        assert bytes(inner.data[4096:4100]) == b"good"
        assert device.statistics().dropped_writes == 3

    run(main)


def test_drop_writes_without_flakey_drops_every_write() -> None:
    device, inner = faulty(FaultSpec(drop_writes=True))
    before = bytes(inner.data[:16])
    device.write_sync(0, b"0123456789abcdef")
    device.flush_sync()
    assert bytes(inner.data[:16]) == before
    assert device.read_sync(0, 16) == before


# ---- bit flips ----------------------------------------------------------------------------------


def test_bitflip_changes_the_returned_data_not_the_disk() -> None:
    device, inner = faulty(FaultSpec(bitflip=1.0, seed=3))
    on_disk = bytes(inner.data[:65536])

    def flipped_bits(got: bytes) -> int:
        return sum(bin(a ^ b).count("1") for a, b in zip(got, on_disk, strict=True))

    assert flipped_bits(device.read_sync(0, 65536)) == 1

    async def main() -> None:
        assert flipped_bits(await device.read(0, 65536)) == 1
        buf = bytearray(65536)
        await device.readinto(0, buf)
        assert flipped_bits(bytes(buf)) == 1

    run(main)
    assert bytes(inner.data[:65536]) == on_disk
    assert device.statistics().bit_flips == 3

    device.set_spec(FaultSpec(bitflip=0.25, seed=9))
    changed = sum(device.read_sync(0, 4096) != on_disk[:4096] for _ in range(400))
    assert 60 <= changed <= 140
    device.clear()
    assert device.read_sync(0, 65536) == on_disk


# ---- the spec -----------------------------------------------------------------------------------


def test_spec_round_trips_and_rejects_nonsense() -> None:
    spec = FaultSpec(read_error=0.01, ranges=((0, 4096),), latency=0.02, jitter=0.005,
                     bandwidth=10 * MiB, bitflip=0.001, flakey_up=5, flakey_down=1,
                     drop_writes=True, seed=4)
    assert FaultSpec.from_dict(spec.to_dict()) == spec
    assert "read error 1%" in spec.describe()
    assert "latency 20ms±5ms" in spec.describe()
    assert FaultSpec().describe() == "none"
    assert FaultSpec().empty
    bad: list[dict[str, Any]] = [
        {"read_error": 1.5}, {"write_error": -0.1}, {"bitflip": "1%"}, {"latency": -1},
        {"latency": float("nan")}, {"latency": 0.01, "jitter": 0.02}, {"bandwidth": 1.5},
        {"bandwidth": -1}, {"flakey_up": 5}, {"dead": 1}, {"seed": -3},
        {"ranges": [[0, 0]], "read_error": 1}, {"ranges": [[-1, 5]], "read_error": 1},
        {"ranges": [[0, 4096]]}, {"dead": True, "latency": 0.1}, {"colour": "red"},
        {"ranges": "0:4096"},
    ]
    for data in bad:
        with pytest.raises(InvalidInput):
            FaultSpec.from_dict(data)
    with pytest.raises(InvalidInput):
        FaultSpec.from_dict(["dead"])


# ---- CLI values ---------------------------------------------------------------------------------


def test_cli_value_parsers() -> None:
    assert parse_percent("1%", "--read-error") == pytest.approx(0.01)
    assert parse_percent("0.5%", "--read-error") == pytest.approx(0.005)
    assert parse_percent("100%", "--bitflip") == 1.0
    assert parse_duration("20ms", "--latency") == pytest.approx(0.02)
    assert parse_duration("1.5s", "--latency") == 1.5
    assert parse_duration("500us", "--latency") == pytest.approx(0.0005)
    assert parse_bandwidth("10M") == 10 * MiB == parse_bandwidth("10M/s")
    assert parse_range("1G:4K") == (1 << 30, 4096)
    assert parse_flakey("5:1") == (5.0, 1.0)
    assert parse_flakey("2.5:500ms") == (2.5, 0.5)
    assert parse_seed("42") == 42
    errors = {
        lambda: parse_percent("5", "--read-error"): "--read-error takes a percentage like 1%",
        lambda: parse_percent("150%", "--read-error"): "percentage",
        lambda: parse_percent("-1%", "--write-error"): "--write-error takes a percentage",
        lambda: parse_duration("20", "--latency"): "--latency takes a duration like 20ms",
        lambda: parse_duration("fast", "--jitter"): "--jitter takes a duration",
        lambda: parse_bandwidth("0"): "larger than zero",
        lambda: parse_bandwidth("lots"): "--bandwidth takes bytes per second",
        lambda: parse_range("4096"): "--range takes OFFSET:LENGTH",
        lambda: parse_range("0:0"): "larger than zero",
        lambda: parse_flakey("5"): "--flakey takes UP:DOWN",
        lambda: parse_flakey("5:0"): "longer than zero",
        lambda: parse_seed("x"): "--seed takes a whole number",
    }
    for call, message in errors.items():
        with pytest.raises(InvalidInput) as caught:
            call()
        assert message in str(caught.value)
        assert "\n" not in str(caught.value)


def _inject_args(*options: str) -> Any:
    return cli.build_parser().parse_args(["fault", "inject", "tank", "1", *options])


def test_cli_options_to_spec() -> None:
    spec = spec_from_args(_inject_args("--read-error", "1%", "--latency", "20ms", "--jitter",
                                       "5ms", "--bandwidth", "10M", "--seed", "9"))
    assert spec == FaultSpec(read_error=0.01, latency=0.02, jitter=0.005,
                             bandwidth=10 * MiB, seed=9)
    ranged = spec_from_args(_inject_args("--range", "0:4K", "--range", "1M:1M"))
    assert ranged.ranges == ((0, 4096), (MiB, MiB))
    assert ranged.read_error == ranged.write_error == 1.0  # a bad range fails both
    assert spec_from_args(_inject_args("--range", "0:4K", "--read-error", "100%")).write_error == 0
    flakey = spec_from_args(_inject_args("--flakey", "5:1", "--drop-writes"))
    assert (flakey.flakey_up, flakey.flakey_down, flakey.drop_writes) == (5, 1, True)
    assert spec_from_args(_inject_args("--dead", "--seed", "1")).dead
    for options, message in (
        ((), "needs at least one fault"),
        (("--jitter", "5ms"), "give --latency too"),
        (("--latency", "5ms", "--jitter", "10ms"), "cannot exceed --latency"),
        (("--dead", "--latency", "5ms"), "--dead fails every request"),
    ):
        with pytest.raises(InvalidInput) as caught:
            spec_from_args(_inject_args(*options))
        assert message in str(caught.value)


def test_cli_bad_values_exit_2_before_anything_happens(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = str(tmp_path / "state")
    code = cli.main(["--state-dir", state, "fault", "inject", "tank", "1", "--read-error", "5"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err == ("blockspace: error: --read-error takes a percentage like 1% or 0.5%, "
                   "not '5'")
    assert not os.path.exists(state)  # validated before even the registry was looked at
    assert cli.main(["--state-dir", state, "fault", "list", "tank"]) == 2  # no such pool
    assert "no pool named 'tank'" in capsys.readouterr().err


# ---- the daemon's side, in-process --------------------------------------------------------------


async def _memory_pool(disks: int) -> tuple[Pool, list[FaultyDevice]]:
    devices = [FaultyDevice(MemoryDevice(12 * MiB, path=f"/img/disk{i}.img"))
               for i in range(disks)]
    pool = await Pool.create("tank", devices, media=["hdd"] * disks, slab_size=MiB,
                             meta_slot_size=64 << 10)
    return pool, devices


def test_control_requests_refused_unless_enabled() -> None:
    async def main() -> None:
        pool, devices = await _memory_pool(2)
        for op in ("fault_inject", "fault_clear", "fault_list"):
            with pytest.raises(BlockspaceError) as caught:  # no fault layer on this mount
                handle_fault_request(pool, None, op, {"disk": "0", "spec": {"dead": True}})
            assert str(caught.value) == DISABLED_MESSAGE
        assert all(d.spec.empty for d in devices)

        faulty = {d.path: d for d in devices}

        def handle(op: str, request: dict[str, Any]) -> Any:
            return handle_fault_request(pool, faulty, op, request)

        report = handle("fault_inject", {"disk": "disk1", "spec": {"latency": 0.01}})
        assert (report["id"], report["path"], report["state"]) == (1, "/img/disk1.img", "online")
        assert devices[1].spec.latency == 0.01
        report = handle("fault_inject",
                        {"disk": "/img/disk0.img", "spec": {"read_error": 0.5, "seed": 1}})
        assert report["id"] == 0
        assert report["seed"] == 1
        for request, message in (
            ({"disk": "7", "spec": {"dead": True}}, "has no disk '7'"),
            ({"disk": "", "spec": {"dead": True}}, "name a disk by its id"),
            ({"disk": "0", "spec": {}}, "no fault given"),
            ({"disk": "0", "spec": {"read_error": 3}}, "probability"),
            ({"disk": "0", "spec": {"read_error": 1, "ranges": [[12 * MiB - 1, 2]]}},
             "past the end of disk 0"),
        ):
            with pytest.raises(InvalidInput) as caught:
                handle("fault_inject", request)
            assert message in str(caught.value)
        assert devices[0].spec.read_error == 0.5  # a refused request changed nothing
        listed = handle("fault_list", {})
        assert [d["description"] for d in listed] == ["read error 50%, seed 1", "latency 10ms"]
        cleared = handle("fault_clear", {"disk": "1"})
        assert cleared["cleared"] == [1]
        assert devices[1].spec.empty
        assert handle("fault_clear", {})["cleared"] == [0]
        assert all(d.spec.empty for d in devices)
        with pytest.raises(InvalidInput) as caught:
            handle("fault_bogus", {})
        assert "unknown request 'fault_bogus'" in str(caught.value)

        # A disk that was not there at mount has no FaultyDevice: named, it is refused; the
        # list and a clear of all leave it out.
        del faulty[devices[1].path]
        with pytest.raises(InvalidInput) as caught:
            handle("fault_inject", {"disk": "1", "spec": {"dead": True}})
        assert "was not present at mount" in str(caught.value)
        assert [d["id"] for d in handle("fault_list", {})] == [0]
        assert [d["id"] for d in handle("fault_clear", {})["disks"]] == [0]

    run(main)


def test_mirror_volume_rides_out_a_dead_disk_in_process() -> None:
    async def main() -> None:
        pool, devices = await _memory_pool(2)
        spec = LayoutSpec("mirror", 1, copies=2, interleave=16384)
        volume = Volume(pool, await pool.create_volume("vol", 3 * MiB, spec, "thin"))
        data = random.Random(5).randbytes(2 * MiB)
        await volume.write(0, data)
        devices[1].set_spec(FaultSpec(dead=True))
        assert await volume.read(0, len(data)) == data
        await volume.write(MiB, data[:MiB])
        assert await volume.read(MiB, MiB) == data[:MiB]
        assert pool.disks[1].record.state == "failed"
        assert devices[1].statistics().injected_write_errors >= 1

    run(main)
