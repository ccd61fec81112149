"""Device I/O: image files, loop devices and the in-memory test device."""

from __future__ import annotations

import errno
import os
import random
import shutil
import subprocess
import threading
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from blockspace.disks.devices import (
    Device,
    DeviceInfo,
    FileDevice,
    open_device,
    probe,
)
from blockspace.errors import BlockspaceError, DeviceError, InvalidInput
from blockspace.testing.memory_device import MemoryDevice

MiB = 1 << 20
IMAGE_SIZE = 64 * MiB
LOOP_SIZE = 16 * MiB


def run(fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
    return trio.run(fn, *args)


def pattern(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


@pytest.fixture
def image(tmp_path: Path) -> str:
    """A sparse 64 MiB image file."""
    path = tmp_path / "disk.img"
    with open(path, "wb") as f:
        f.truncate(IMAGE_SIZE)
    return str(path)


@pytest.fixture
def loop_device(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A real loop device over a sparse 16 MiB image: (device path, backing image path).
    Always detached afterwards, even when the test fails."""
    if os.geteuid() != 0:
        pytest.skip("loop devices need root")
    if not os.path.exists("/dev/loop-control"):
        pytest.skip("/dev/loop-control is missing (no loop driver)")
    if shutil.which("losetup") is None:
        pytest.skip("losetup is not installed")
    backing = tmp_path / "loop.img"
    with open(backing, "wb") as f:
        f.truncate(LOOP_SIZE)
    proc = subprocess.run(
        ["losetup", "-f", "--show", str(backing)], capture_output=True, text=True, check=True
    )
    dev = proc.stdout.strip()
    try:
        yield dev, backing
    finally:
        subprocess.run(["losetup", "-d", dev], check=False, capture_output=True)


def worker_threads(dev: FileDevice) -> list[threading.Thread]:
    return list(dev._threads)


# ---------------------------------------------------------------------------- probe


def test_probe_image_file(image: str) -> None:
    assert probe(image) == DeviceInfo(path=image, size=IMAGE_SIZE, is_block=False, rotational=None)


def test_probe_loop_device_uses_ioctl_size(loop_device: tuple[str, Path]) -> None:
    dev, _ = loop_device
    info = probe(dev)
    assert info.path == dev
    assert info.is_block is True
    assert info.size == LOOP_SIZE  # BLKGETSIZE64; stat() would say 0
    assert os.stat(dev).st_size == 0
    assert isinstance(info.rotational, bool)


def test_probe_missing_path(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.img")
    with pytest.raises(InvalidInput, match="no such file") as exc:
        probe(missing)
    assert missing in str(exc.value)
    assert "\n" not in str(exc.value)
    with pytest.raises(InvalidInput, match="no such file"):
        FileDevice(missing)


def test_probe_directory(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="not a regular file or block device") as exc:
        probe(str(tmp_path))
    assert str(tmp_path) in str(exc.value)
    assert "directory" in str(exc.value)


def test_probe_character_device() -> None:
    with pytest.raises(InvalidInput, match="character device"):
        probe("/dev/null")


# ---------------------------------------------------------------------------- image files


def test_concurrent_round_trip_against_model(image: str) -> None:
    """Many tasks read and write random, unaligned ranges at once; every read must match a
    bytearray model, and so must the whole device at the end."""
    model = bytearray(IMAGE_SIZE)
    tasks = 32
    region = IMAGE_SIZE // tasks  # each task owns a region, so the model stays exact

    async def worker(dev: FileDevice, i: int) -> None:
        rng = random.Random(i)
        base = i * region
        for step in range(60):
            length = rng.randint(1, 96 * 1024)
            offset = base + rng.randrange(region - length)
            if rng.random() < 0.5:
                data = pattern(length, i * 1000 + step)
                buf: bytes | bytearray | memoryview = data
                if step % 3 == 1:
                    buf = bytearray(data)
                elif step % 3 == 2:
                    buf = memoryview(data)
                await dev.write(offset, buf)
                model[offset : offset + length] = data
            else:
                assert await dev.read(offset, length) == model[offset : offset + length]

    async def main() -> None:
        with FileDevice(image, workers=4) as dev:
            async with trio.open_nursery() as nursery:
                for i in range(tasks):
                    nursery.start_soon(worker, dev, i)
            await dev.flush()
            for offset in range(0, IMAGE_SIZE, 4 * MiB):
                assert await dev.read(offset, 4 * MiB) == model[offset : offset + 4 * MiB]

    run(main)
    with open(image, "rb") as f:
        assert f.read() == model


def test_sync_api_round_trip(image: str) -> None:
    with open_device(image) as dev:
        dev.write_sync(12345, b"hello, disk")
        dev.flush_sync()
        assert dev.read_sync(12345, 11) == b"hello, disk"
        dev.zero_sync(12346, 3)
        assert dev.read_sync(12345, 11) == b"h\0\0\0o, disk"
        assert worker_threads(dev) == []  # offline use never starts threads


def test_read_and_write_out_of_range_raise_without_io(image: str) -> None:
    async def main() -> None:
        with FileDevice(image) as dev:
            for offset, length in [(IMAGE_SIZE - 10, 20), (IMAGE_SIZE, 1), (-1, 10), (0, -1)]:
                with pytest.raises(DeviceError, match="outside the device") as exc:
                    await dev.read(offset, length)
                assert exc.value.os_errno is None  # type: ignore[attr-defined]
                if length >= 0:
                    with pytest.raises(DeviceError, match="outside the device"):
                        await dev.write(offset, b"x" * length)
                with pytest.raises(DeviceError, match="outside the device"):
                    dev.read_sync(offset, length)
            with pytest.raises(DeviceError, match="outside the device"):
                await dev.zero(IMAGE_SIZE - 4096, 8192)
            assert await dev.read(IMAGE_SIZE, 0) == b""
            assert await dev.read(IMAGE_SIZE - 4, 4) == b"\0" * 4
            stats = dev.statistics()
            assert (stats.writes, stats.errors, stats.bytes_written) == (0, 0, 0)
            assert worker_threads(dev) == []  # nothing ever reached a worker

    run(main)


def test_zero_image_file_punches_a_hole(image: str) -> None:
    data = pattern(8 * MiB, 1)

    async def main() -> None:
        with FileDevice(image) as dev:
            await dev.write(0, data)
            await dev.flush()
            blocks_before = os.stat(image).st_blocks
            await dev.zero(MiB + 100, 4 * MiB)  # unaligned ends
            await dev.flush()
            assert await dev.read(MiB + 100, 4 * MiB) == bytes(4 * MiB)
            assert await dev.read(0, MiB + 100) == data[: MiB + 100]
            assert await dev.read(5 * MiB + 100, 3 * MiB - 100) == data[5 * MiB + 100 :]
            assert os.stat(image).st_blocks < blocks_before  # space was given back
            assert os.stat(image).st_size == IMAGE_SIZE  # KEEP_SIZE
            await dev.zero(0, 0)  # empty range: fine

    run(main)
    with open(image, "rb") as f:
        on_disk = f.read(8 * MiB)
    assert on_disk == data[: MiB + 100] + bytes(4 * MiB) + data[5 * MiB + 100 :]


def test_zero_falls_back_to_writing_zeros(image: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where hole punching is unsupported (EOPNOTSUPP), zero() writes zeros instead."""
    import blockspace.disks.devices as devices

    def unsupported(fd: int, mode: int, offset: int, length: int) -> int:
        import ctypes

        ctypes.set_errno(errno.EOPNOTSUPP)
        return -1

    monkeypatch.setattr(devices, "_libc_fallocate", lambda: unsupported)
    with FileDevice(image) as dev:
        dev.write_sync(0, b"\xff" * (3 * MiB))
        dev.zero_sync(10, 2 * MiB + 7)
        assert dev.read_sync(0, 3 * MiB) == (
            b"\xff" * 10 + bytes(2 * MiB + 7) + b"\xff" * (MiB - 17)
        )


def test_zero_loop_device(loop_device: tuple[str, Path]) -> None:
    path, backing = loop_device
    data = pattern(6 * MiB, 2)
    start, length = 512 * 1024 + 77, 3 * MiB + 1000  # unaligned head and tail

    async def main() -> None:
        with FileDevice(path) as dev:
            assert dev.is_block
            assert dev.size == LOOP_SIZE
            await dev.write(0, data)
            await dev.flush()
            await dev.zero(start, length)
            await dev.flush()
            got = await dev.read(0, 6 * MiB)
            assert got[start : start + length] == bytes(length)
            assert got[:start] == data[:start]
            assert got[start + length :] == data[start + length :]
            await dev.zero(100, 50)  # smaller than one logical block
            assert await dev.read(0, 200) == data[:100] + bytes(50) + data[150:200]

    run(main)
    expected = bytearray(data)
    expected[start : start + length] = bytes(length)
    expected[100:150] = bytes(50)
    with open(backing, "rb") as f:  # it really reached the backing image
        assert f.read(6 * MiB) == expected


def test_loop_device_round_trip_and_exclusive(loop_device: tuple[str, Path]) -> None:
    path, _ = loop_device

    async def main() -> None:
        with FileDevice(path) as dev:
            await dev.write(LOOP_SIZE - 4096, b"tail" * 1024)
            await dev.flush()
            assert await dev.read(LOOP_SIZE - 4096, 4096) == b"tail" * 1024
            with pytest.raises(BlockspaceError, match="in use by another process"):
                FileDevice(path)

    run(main)
    FileDevice(path).close()  # free again


def test_exclusive_lock(image: str) -> None:
    first = FileDevice(image)
    try:
        with pytest.raises(BlockspaceError, match="in use by another process") as exc:
            FileDevice(image)
        assert not isinstance(exc.value, DeviceError)
        assert str(exc.value) == f"{image} is in use by another process (a mounted pool?)"
        FileDevice(image, exclusive=False).close()  # opting out of the lock works
    finally:
        first.close()
    FileDevice(image).close()  # the lock went away with close()


def test_flush(image: str) -> None:
    async def main() -> None:
        with FileDevice(image) as dev:
            await dev.write(4096, b"durable")
            await dev.flush()
            dev.flush_sync()
            assert dev.statistics().flushes == 2

    run(main)
    with open(image, "rb") as f:
        f.seek(4096)
        assert f.read(7) == b"durable"


def test_os_errors_become_device_errors_with_errno(image: str) -> None:
    """Put a write-only fd under the device: reads fail with EBADF from the OS."""
    dev = FileDevice(image)
    null = os.open("/dev/null", os.O_WRONLY)
    try:
        os.dup2(null, dev.fileno())

        async def main() -> None:
            with pytest.raises(DeviceError) as exc:
                await dev.read(4096, 100)
            assert exc.value.os_errno == errno.EBADF  # type: ignore[attr-defined]
            assert exc.value.errno == errno.EIO  # what FUSE hands to the kernel
            assert str(exc.value) == f"{image}: read at 4096: {os.strerror(errno.EBADF)}"
            buf = bytearray(10)
            with pytest.raises(DeviceError, match="read at 0"):
                await dev.readinto(0, buf)

        run(main)
        with pytest.raises(DeviceError, match="read at 8192") as exc:
            dev.read_sync(8192, 1)
        assert exc.value.os_errno == errno.EBADF  # type: ignore[attr-defined]
        assert dev.statistics().errors == 3
    finally:
        os.close(null)
        dev.close()


def test_read_only_device_refuses_writes(image: str) -> None:
    async def main() -> None:
        with open_device(image, writable=False) as dev:
            assert await dev.read(0, 10) == bytes(10)
            with pytest.raises(DeviceError, match="read-only"):
                await dev.write(0, b"x")
            with pytest.raises(DeviceError, match="read-only"):
                await dev.zero(0, 4096)
            with pytest.raises(DeviceError, match="read-only"):
                dev.write_sync(0, b"x")

    run(main)


def test_short_read_when_file_shrinks(image: str) -> None:
    async def main() -> None:
        with FileDevice(image) as dev:
            os.truncate(image, MiB)  # the image shrank behind our back
            with pytest.raises(DeviceError, match="short read"):
                await dev.read(MiB - 10, 100)
            with pytest.raises(DeviceError, match="short read"):
                dev.read_sync(2 * MiB, 1)

    run(main)


def test_statistics_count(image: str) -> None:
    async def main() -> None:
        with FileDevice(image) as dev:
            assert dev.statistics().reads == 0
            await dev.write(0, b"a" * 1000)
            await dev.write(5000, memoryview(b"b" * 24))
            await dev.read(0, 100)
            await dev.read(10, 10)
            dev.read_sync(0, 1)
            with pytest.raises(DeviceError):
                await dev.read(IMAGE_SIZE, 1)  # rejected: not an I/O error
            stats = dev.statistics()
            assert (stats.writes, stats.bytes_written) == (2, 1024)
            assert (stats.reads, stats.bytes_read) == (3, 111)
            assert stats.errors == 0

    run(main)


def test_cached_read_completes_inline(image: str) -> None:
    async def main() -> None:
        with FileDevice(image) as dev:
            data = pattern(64 * 1024, 3)
            await dev.write(MiB, data)  # through a worker, into the page cache
            await dev.flush()
            assert await dev.read(MiB, len(data)) == data
            stats = dev.statistics()
            assert stats.inline_reads == 1, "a cached read should not need a thread hop"
            assert stats.reads == 1
            buf = bytearray(len(data) + 10)
            await dev.readinto(MiB, memoryview(buf)[5:-5])
            assert buf[5:-5] == data
            assert dev.statistics().inline_reads == 2

            # Not cached any more: the read goes to a worker (RWF_NOWAIT would block).
            os.posix_fadvise(dev.fileno(), MiB, len(data), os.POSIX_FADV_DONTNEED)
            assert await dev.read(MiB, len(data)) == data
            stats = dev.statistics()
            assert (stats.reads, stats.inline_reads) == (3, 2)

    run(main)


def test_inline_reads_still_checkpoint(image: str) -> None:
    """A loop of cached reads must not starve other tasks nor ignore cancellation."""

    async def main() -> None:
        with FileDevice(image) as dev:
            await dev.write(0, b"x" * 4096)
            ticks = 0

            async def ticker() -> None:
                nonlocal ticks
                while True:
                    ticks += 1
                    await trio.lowlevel.checkpoint()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(ticker)
                for _ in range(100):
                    await dev.read(0, 4096)
                nursery.cancel_scope.cancel()
            assert ticks >= 50
            assert dev.statistics().inline_reads >= 100
            with trio.CancelScope() as scope:
                scope.cancel()
                await dev.read(0, 4096)
                pytest.fail("read did not notice the cancellation")

    run(main)


def test_cancel_withdraws_a_queued_request(image: str) -> None:
    gate = threading.Event()

    async def main() -> None:
        with FileDevice(image, workers=1) as dev:
            dev._use_ring = False  # the worker path itself is under test
            async with trio.open_nursery() as nursery:
                nursery.start_soon(dev._run, gate.wait)  # occupies the only worker
                await trio.testing.wait_all_tasks_blocked()
                with trio.move_on_after(0.05) as scope:
                    await dev.write(0, b"x" * 4096)
                assert scope.cancelled_caught
                gate.set()
            assert dev.read_sync(0, 4096) == bytes(4096)  # the write never happened
            assert dev.statistics().writes == 0

    run(main)


def test_cancel_abandons_a_started_request_so_a_hung_disk_cannot_hang_the_caller(
    image: str,
) -> None:
    """Once a worker runs a request the syscall cannot be interrupted, but the task is
    released at once (a timeout on a hung disk must fire) and the late result is dropped."""
    started, gate = threading.Event(), threading.Event()
    results: list[object] = []

    def blocking() -> int:
        started.set()
        gate.wait()
        return 42

    async def main() -> None:
        with FileDevice(image, workers=1) as dev:
            try:
                with trio.move_on_after(5) as scope:
                    async with trio.open_nursery() as nursery:

                        async def job() -> None:
                            with trio.CancelScope() as cs:
                                waiter.append(cs)
                                results.append(await dev._run(blocking))
                            results.append("cancelled")

                        waiter: list[trio.CancelScope] = []
                        nursery.start_soon(job)
                        await trio.to_thread.run_sync(started.wait)
                        waiter[0].cancel()
                assert not scope.cancelled_caught  # released without waiting for the syscall
                assert results == ["cancelled"]
            finally:
                gate.set()  # let the worker finish so the device can close
        assert results == ["cancelled"]  # the late 42 was dropped, not delivered

    run(main)


def test_close_is_idempotent_and_stops_workers(image: str) -> None:
    dev = FileDevice(image, workers=3)

    async def main() -> None:
        await dev.write(0, b"abc")
        await dev.flush()

    run(main)
    threads = worker_threads(dev)
    assert len(threads) == 3
    assert all(t.is_alive() for t in threads)
    dev.close()
    dev.close()
    assert dev.closed
    assert not any(t.is_alive() for t in threads)
    with pytest.raises(DeviceError, match="closed"):
        dev.read_sync(0, 3)
    with pytest.raises(DeviceError, match="closed"):
        run(dev.read, 0, 3)

    mem = MemoryDevice(4096)
    mem.close()
    mem.close()
    with pytest.raises(DeviceError, match="closed"):
        mem.read_sync(0, 1)


def test_unclosed_device_is_cleaned_up_by_gc(image: str) -> None:
    import gc

    dev = FileDevice(image)
    run(dev.write, 0, b"x")
    threads = worker_threads(dev)
    fd = dev.fileno()
    del dev
    gc.collect()
    for t in threads:
        t.join(timeout=5)
    assert not any(t.is_alive() for t in threads)
    with pytest.raises(OSError, match="Bad file descriptor"):
        os.fstat(fd)
    FileDevice(image).close()  # lock released


# ---------------------------------------------------------------------------- memory device


def test_memory_device_round_trip_and_faults() -> None:
    async def main() -> None:
        dev = MemoryDevice(MiB, path="mem0")
        assert isinstance(dev, Device)
        await dev.write(100, b"hello")
        assert await dev.read(100, 5) == b"hello"
        await dev.zero(101, 2)
        assert await dev.read(100, 5) == b"h\0\0lo"
        buf = bytearray(5)
        await dev.readinto(100, buf)
        assert buf == b"h\0\0lo"

        dev.failed = True
        for op in (dev.read(0, 1), dev.write(0, b"x"), dev.flush(), dev.zero(0, 1)):
            with pytest.raises(DeviceError, match="^mem0: .*Input/output error$") as exc:
                await op
            assert exc.value.os_errno == errno.EIO  # type: ignore[attr-defined]
        with pytest.raises(DeviceError):
            dev.read_sync(0, 1)
        dev.failed = False
        assert await dev.read(100, 1) == b"h"

        dev.bad_ranges.append((4096, 512))
        with pytest.raises(DeviceError, match="read at 4000"):
            await dev.read(4000, 100)
        assert await dev.read(4000, 96) == bytes(96)  # just before the bad range
        await dev.write(4096, b"ok")  # writes still work

        with pytest.raises(DeviceError, match="outside the device"):
            await dev.read(MiB - 1, 2)
        stats = dev.statistics()
        assert stats.errors == 6
        assert (stats.writes, stats.reads) == (2, 5)

    run(main)


def test_memory_device_delay_is_a_slow_disk() -> None:
    async def main() -> None:
        dev = MemoryDevice(4096)
        dev.delay = 10.0
        with trio.move_on_after(0.01) as scope:
            await dev.write(0, b"x")
        assert scope.cancelled_caught
        assert dev.data[0] == 0  # cancelled before it happened

    run(main)


def test_write_many_is_one_worker_job_in_order(image: str) -> None:
    """A block and its checksum entries go to the disk in one worker round trip, in order;
    statistics count every piece."""

    async def main() -> None:
        with FileDevice(image, workers=2) as dev:
            dev._use_ring = False  # the worker path itself is under test
            jobs: list[object] = []
            real_run = dev._run

            async def counting_run(fn: Callable[..., Any], *args: Any) -> Any:
                jobs.append(fn)
                return await real_run(fn, *args)

            dev._run = counting_run  # type: ignore[method-assign]
            block, entries = pattern(8192, 1), pattern(16, 2)
            await dev.write_many([(4096, memoryview(block)), (MiB, entries)])
            assert len(jobs) == 1
            assert await dev.read(4096, 8192) == block
            assert await dev.read(MiB, 16) == entries
            # overlapping pieces: the later one wins, as with two writes in a row
            await dev.write_many([(0, b"a" * 100), (50, b"b" * 10)])
            assert await dev.read(0, 100) == b"a" * 50 + b"b" * 10 + b"a" * 40
            stats = dev.statistics()
            assert (stats.writes, stats.bytes_written) == (4, 8192 + 16 + 110)

    run(main)


def test_write_many_checks_every_piece_before_writing_any(image: str) -> None:
    async def main() -> None:
        with FileDevice(image) as dev:
            with pytest.raises(DeviceError, match=f"write at {IMAGE_SIZE}"):
                await dev.write_many([(0, b"x" * 4096), (IMAGE_SIZE, b"y")])
            assert await dev.read(0, 4096) == bytes(4096)
        with open_device(image, writable=False) as ro:
            with pytest.raises(DeviceError, match="read-only"):
                await ro.write_many([(0, b"x")])

    run(main)


def test_write_many_on_a_plain_device_writes_piece_by_piece() -> None:
    """The fallback goes through `write`, so a wrapper (fault injection) sees each piece."""
    seen: list[int] = []

    class Recording(MemoryDevice):
        async def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
            seen.append(offset)
            await super().write(offset, data)

    async def main() -> None:
        dev = Recording(MiB)
        await dev.write_many([(8192, b"d" * 4096), (4096, b"e" * 16)])
        assert seen == [8192, 4096]
        assert dev.read_sync(8192, 4096) == b"d" * 4096
        assert dev.read_sync(4096, 16) == b"e" * 16
        dev.failed = True
        with pytest.raises(DeviceError):
            await dev.write_many([(0, b"x")])

    run(main)


def test_write_many_that_hangs_still_releases_its_caller(image: str) -> None:
    """A combined write stuck in the kernel (a hung disk) must not hold the task past its
    timeout, like any other request."""
    gate = threading.Event()

    async def main() -> None:
        with FileDevice(image, workers=1) as dev:
            dev._use_ring = False  # the worker path itself is under test
            real = dev._pwrite_many

            def stuck(pieces: list[tuple[int, bytes]]) -> None:
                gate.wait()
                real(pieces)

            dev._pwrite_many = stuck  # type: ignore[method-assign]
            try:
                with trio.move_on_after(0.2) as scope:
                    await dev.write_many([(0, b"x" * 4096), (MiB, b"y" * 16)])
                assert scope.cancelled_caught
            finally:
                gate.set()

    run(main)


def test_many_completions_at_once_each_reach_their_task(image: str) -> None:
    """Completions are handed back in batches: every task still gets its own result, and
    requests started from a batch's callbacks complete too."""

    async def main() -> None:
        with FileDevice(image, workers=4) as dev:
            results: dict[int, bytes] = {}

            async def one(i: int) -> None:
                data = pattern(4096, i)
                await dev.write_many([(i * 8192, data), (IMAGE_SIZE - 16 * (i + 1), b"%16d" % i)])
                results[i] = await dev.read(i * 8192, 4096)

            async with trio.open_nursery() as nursery:
                for i in range(200):
                    nursery.start_soon(one, i)
            assert all(results[i] == pattern(4096, i) for i in range(200))
            assert await dev.read(IMAGE_SIZE - 16, 16) == b"%16d" % 0

    run(main)
    run(main)  # a second trio run gets its own completion queue


def test_fault_injection_applies_to_each_piece_of_a_combined_write(image: str) -> None:
    """A FaultyDevice over a FileDevice: the combined write goes piece by piece through the
    fault layer, so an error range over the checksum area fails it and a dropped write
    drops both pieces."""
    from blockspace.disks.faults import FaultSpec, FaultyDevice

    async def main() -> None:
        with FileDevice(image) as inner:
            dev = FaultyDevice(inner, FaultSpec(write_error=1.0, ranges=((MiB, 4096),)))
            with pytest.raises(DeviceError, match=f"write at {MiB}"):
                await dev.write_many([(0, b"d" * 4096), (MiB, b"e" * 16)])
            assert inner.read_sync(MiB, 16) == bytes(16)
            dev.set_spec(FaultSpec(drop_writes=True))
            await dev.write_many([(8192, b"d" * 4096), (MiB, b"e" * 16)])
            assert inner.read_sync(8192, 4096) == bytes(4096)
            dev.set_spec(FaultSpec())
            await dev.write_many([(8192, b"d" * 4096), (MiB, b"e" * 16)])
            assert inner.read_sync(8192, 4096) == b"d" * 4096
            assert inner.read_sync(MiB, 16) == b"e" * 16

    run(main)


def test_read_now_serves_only_cached_bytes_and_never_raises(image: str) -> None:
    """The volume's hot path: cached bytes at once, anything else None (the caller then
    goes through `read`, which reports errors)."""

    async def main() -> None:
        with FileDevice(image) as dev:
            data = pattern(8192, 5)
            await dev.write(MiB, data)
            await dev.flush()
            assert dev.read_now(MiB, len(data)) == data
            assert dev.statistics().inline_reads == 1
            assert dev.read_now(dev.size - 4096, 8192) is None  # past the end
            assert dev.read_now(-4096, 4096) is None
            for _ in range(20):  # eviction is best effort: pages busy at that moment stay
                os.posix_fadvise(dev.fileno(), MiB, len(data), os.POSIX_FADV_DONTNEED)
                if dev.read_now(MiB, len(data)) is None:  # not cached: it would block
                    break
                await trio.sleep(0.05)
            else:
                pytest.fail("read_now served bytes that are not in the page cache")
            assert await dev.read(MiB, len(data)) == data
        assert dev.read_now(MiB, 4096) is None  # closed
        assert MemoryDevice(MiB).read_now(0, 4096) is None  # tests keep the async path

    run(main)


def test_read_now_into_scatters_cached_bytes_into_the_buffers_given(image: str) -> None:
    """A request's stripe units read at once straight into their places in the reply; the
    same refusals as `read_now` (not cached, out of range, too many buffers, faults)."""
    from blockspace.disks.faults import FaultSpec, FaultyDevice

    async def main() -> None:
        with FileDevice(image) as dev:
            data = pattern(12288, 7)
            await dev.write(MiB, data)
            out = bytearray(20480)
            view = memoryview(out)
            places = [view[16384:20480], view[0:8192]]  # disk order is not buffer order
            assert dev.read_now_into(MiB, places)
            assert out[16384:] == data[:4096]
            assert out[:8192] == data[4096:]
            assert not dev.read_now_into(dev.size - 4096, [view[:8192]])  # past the end
            assert not dev.read_now_into(0, [view[i : i + 1] for i in range(1025)])  # IOV_MAX
            faulty = FaultyDevice(dev, FaultSpec(bitflip=1.0))
            assert not faulty.read_now_into(MiB, places)  # faults act on the async path
            faulty.clear()
            assert faulty.read_now_into(MiB, [view[:4096]])
            assert out[:4096] == data[:4096]
        assert not dev.read_now_into(MiB, [view[:4096]])  # closed
        assert not MemoryDevice(MiB).read_now_into(0, [view[:4096]])

    run(main)


def test_read_now_steps_aside_while_a_fault_is_injected(image: str) -> None:
    from blockspace.disks.faults import FaultSpec, FaultyDevice

    async def main() -> None:
        with FileDevice(image) as inner:
            await inner.write(0, b"z" * 4096)
            dev = FaultyDevice(inner)
            assert dev.read_now(0, 4096) == b"z" * 4096
            dev.set_spec(FaultSpec(bitflip=1.0))
            assert dev.read_now(0, 4096) is None  # the flip happens on the async path
            assert await dev.read(0, 4096) != b"z" * 4096
            dev.set_spec(FaultSpec(dead=True))
            assert dev.read_now(0, 4096) is None
            dev.clear()
            assert dev.read_now(0, 4096) == b"z" * 4096

    run(main)
