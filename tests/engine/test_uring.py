"""Device writes through io_uring (blockspace/disks/uring.py), and the fall-back to workers."""

from __future__ import annotations

import gc
import os
import weakref
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from uring_support import needs_ring
from uring_support import small_tmpfs as small_tmpfs_at

from blockspace.disks import uring
from blockspace.disks.devices import FileDevice
from blockspace.errors import DeviceError

MiB = 1 << 20


@pytest.fixture
def image(tmp_path: Path) -> str:
    path = tmp_path / "disk.img"
    path.write_bytes(b"")
    os.truncate(path, 64 * MiB)
    return str(path)


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs: writes past that fail with ENOSPC."""
    with small_tmpfs_at(tmp_path / "small", "1m") as where:
        yield where


@needs_ring
def test_writes_go_through_the_ring_in_order(image: str) -> None:
    async def main() -> None:
        with FileDevice(image) as dev:
            block, entries = os.urandom(8192), os.urandom(16)
            await dev.write_many([(4096, memoryview(block)), (MiB, entries)])
            await dev.write_many([(0, b"a" * 100), (50, b"b" * 10)])  # the later one wins
            await dev.write(2 * MiB, b"c" * 4096)
            assert dev._ring_writes == 3
            assert dev.read_sync(4096, 8192) == block
            assert dev.read_sync(MiB, 16) == entries
            assert dev.read_sync(0, 100) == b"a" * 50 + b"b" * 10 + b"a" * 40
            assert dev.read_sync(2 * MiB, 4096) == b"c" * 4096
            stats = dev.statistics()
            assert (stats.writes, stats.errors) == (5, 0)
            assert stats.bytes_written == 8192 + 16 + 110 + 4096

    trio.run(main)


@needs_ring
def test_a_failed_ring_write_is_a_device_error_and_stops_the_pieces_after_it(
    small_tmpfs: Path,
) -> None:
    """On a full file system the data piece fails (short, then ENOSPC on the rest), and the
    checksum piece linked after it is never written."""
    path = small_tmpfs / "disk.img"
    path.write_bytes(b"")
    os.truncate(path, 16 * MiB)

    async def main() -> None:
        with FileDevice(str(path)) as dev:
            with pytest.raises(DeviceError, match="No space left on device"):
                await dev.write_many([(0, b"d" * (2 * MiB)), (8 * MiB, b"e" * 16)])
            assert dev.read_sync(8 * MiB, 16) == bytes(16)
            assert dev.statistics().errors == 1

    trio.run(main)


class _Buffer(bytearray):
    """A bytearray that can be weakly referenced: shows who still holds a write's data."""


@needs_ring
def test_a_cancelled_ring_write_is_abandoned_not_lost_track_of(image: str) -> None:
    """The caller goes (its timeout fired); the kernel still owns the buffer, so the ring
    keeps it until the completion comes, then forgets the request: its slot in the ring is
    free again and the buffer is let go. Seen through the ring's public bound on requests
    in flight and a weak reference to the buffer, not its private tables."""

    async def main() -> None:
        with FileDevice(image) as dev:
            data = _Buffer(b"z" * 4096)
            held = weakref.ref(data)
            with trio.CancelScope() as scope:
                scope.cancel()
                await dev.write(0, data)
            assert scope.cancelled_caught  # abandoned, not finished
            del data
            ring = uring.current()
            assert ring is not None
            # A batch that needs every slot of the ring waits (parked, no polling) until the
            # abandoned write's completion has given its slot back.
            with trio.fail_after(10):
                await ring.run(uring.Batch([uring.Chain(
                    dev.fileno(), [(MiB + i * 4096, memoryview(b"y" * 4096))
                                   for i in range(uring.ENTRIES)])]))
            gc.collect()
            assert held() is None  # reaped and forgotten: nothing holds its data any more
            assert dev.read_sync(0, 4096) == b"z" * 4096  # the abandoned write did land
            await dev.write(4096, b"y" * 4096)  # the ring still works
            assert dev.read_sync(4096, 4096) == b"y" * 4096

    trio.run(main)


@needs_ring
def test_a_request_the_ring_refuses_is_written_by_a_worker(image: str) -> None:
    """io_uring_submit failing (or a request too big for the ring) is not a disk error."""

    async def main() -> None:
        ring = uring.current()
        assert ring is not None
        with pytest.raises(OSError, match="pieces in one io_uring request"):
            await ring.write(0, [(0, memoryview(b"x"))] * (uring.ENTRIES + 1))
        with FileDevice(image) as dev:
            async def refuse(fd: int, pieces: object) -> list[int]:
                raise OSError(16, "device or resource busy")

            ring.write = refuse  # type: ignore[method-assign]
            await dev.write_many([(0, b"r" * 4096), (MiB, b"e" * 16)])
            assert dev._ring_writes == 0
            assert dev.read_sync(0, 4096) == b"r" * 4096
            assert dev.read_sync(MiB, 16) == b"e" * 16
            assert dev.statistics().errors == 0

    trio.run(main)


def test_without_io_uring_writes_use_worker_threads(
    image: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(uring.DISABLE_ENV, "1")

    async def main() -> None:
        assert uring.current() is None
        with FileDevice(image) as dev:
            await dev.write_many([(0, b"w" * 4096), (MiB, b"e" * 16)])
            assert dev._ring_writes == 0
            assert dev.read_sync(0, 4096) == b"w" * 4096
            assert dev.read_sync(MiB, 16) == b"e" * 16

    trio.run(main)


def test_check_finds_the_first_piece_not_fully_written() -> None:
    assert uring.check([4096, 16], [4096, 16]) is None
    assert uring.check([100, -125], [4096, 16]) == 0  # short, then cancelled
    assert uring.check([4096, -28], [4096, 16]) == 1
    assert uring.error_of(-28).errno == 28
    assert uring.error_of(5).errno == 5  # a short write with no errno: EIO
