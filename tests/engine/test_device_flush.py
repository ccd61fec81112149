"""A flush reaches the disk: `FileDevice.flush()`/`flush_sync()` call fdatasync on the
device's own file, a failing fdatasync is never acknowledged, and a volume's flush ends in
an fdatasync of every disk of the pool.

The flush counters in `statistics()` are bumped by the device's own code after the call, so
they cannot tell an fdatasync from a no-op; a page-cache test cannot either (the cache
survives everything short of a power cut). Hence `os.fdatasync` is replaced by a recorder
that notes which file each call was for and then does the real call.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from blockspace.disks.devices import FileDevice
from blockspace.errors import DeviceError
from blockspace.geometry.layouts import LayoutSpec
from blockspace.pool.pool import Pool
from blockspace.volume.volume import Volume

MiB = 1 << 20
FileId = tuple[int, int]  # (st_dev, st_ino)


def file_id(path: str | Path) -> FileId:
    info = os.stat(path)
    return info.st_dev, info.st_ino


class SyncRecorder:
    """Stands in for os.fdatasync: records the file behind each fd, then syncs for real
    (or raises `fail` instead). Thread-safe: FileDevice syncs from its worker threads."""

    def __init__(self, real: Callable[[int], None]) -> None:
        self._real = real
        self._lock = threading.Lock()
        self.calls: list[FileId] = []
        self.fail: OSError | None = None

    def __call__(self, fd: int) -> None:
        info = os.fstat(fd)
        with self._lock:
            self.calls.append((info.st_dev, info.st_ino))
        if self.fail is not None:
            raise self.fail
        self._real(fd)


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> SyncRecorder:
    rec = SyncRecorder(os.fdatasync)
    monkeypatch.setattr(os, "fdatasync", rec)
    return rec


def image(directory: Path, name: str, size: int) -> str:
    path = directory / name
    with open(path, "xb") as handle:
        handle.truncate(size)
    return str(path)


def test_flush_fdatasyncs_the_device_file(tmp_path: Path, recorder: SyncRecorder) -> None:
    path = image(tmp_path, "disk.img", 4 * MiB)
    other = image(tmp_path, "other.img", 4 * MiB)  # open too: the sync must pick the right fd

    async def main() -> None:
        with FileDevice(path) as dev, FileDevice(other) as bystander:
            await dev.write(0, b"x" * 4096)
            await bystander.write(0, b"y" * 4096)
            recorder.calls.clear()
            await dev.flush()
            assert recorder.calls == [file_id(path)]
            assert dev.statistics().flushes == 1

    trio.run(main)


def test_flush_sync_fdatasyncs_the_device_file(tmp_path: Path, recorder: SyncRecorder) -> None:
    path = image(tmp_path, "disk.img", 4 * MiB)
    with FileDevice(path) as dev:
        dev.write_sync(0, b"x" * 4096)
        recorder.calls.clear()
        dev.flush_sync()
        assert recorder.calls == [file_id(path)]
        assert dev.statistics().flushes == 1


def test_a_failed_fdatasync_is_never_acknowledged(tmp_path: Path, recorder: SyncRecorder) -> None:
    """EIO from fdatasync means the writes may be lost: the flush must raise, not count."""
    path = image(tmp_path, "disk.img", 4 * MiB)
    recorder.fail = OSError(errno.EIO, os.strerror(errno.EIO))

    async def main() -> None:
        with FileDevice(path) as dev:
            await dev.write(0, b"x" * 4096)
            with pytest.raises(DeviceError) as raised:
                await dev.flush()
            assert raised.value.os_errno == errno.EIO  # type: ignore[attr-defined]
            with pytest.raises(DeviceError):
                dev.flush_sync()
            stats = dev.statistics()
            assert (stats.flushes, stats.errors) == (0, 2)

    trio.run(main)
    assert recorder.calls == [file_id(path)] * 2  # both really tried the device


@pytest.mark.parametrize(
    "spec",
    [LayoutSpec("parity", 2, parity=1, interleave=65536),
     LayoutSpec("mirror", 1, copies=3, interleave=65536)],
    ids=["parity-2+1", "mirror-3"],
)
def test_volume_flush_fdatasyncs_every_disk(
    tmp_path: Path, recorder: SyncRecorder, spec: LayoutSpec
) -> None:
    """Volume.flush -> Pool.flush -> each disk's FileDevice.flush -> fdatasync of its file."""
    paths = [image(tmp_path, f"disk{i}.img", 24 * MiB) for i in range(3)]

    async def main() -> None:
        devices = [FileDevice(path) for path in paths]
        try:
            pool = await Pool.create("t", devices, media=["hdd"] * 3, slab_size=MiB,
                                     meta_slot_size=64 << 10)
            await pool.enable_intent_log()
            record = await pool.create_volume("v", 2 * spec.slab_data_size(MiB), spec, "thin")
            volume = Volume(pool, record)
            await volume.write(4096, os.urandom(128 * 1024))  # the intent log flushes here
            recorder.calls.clear()
            await volume.flush()
            assert sorted(recorder.calls) == sorted(file_id(p) for p in paths)
        finally:
            for dev in devices:
                dev.close()

    trio.run(main)


def test_a_flush_with_no_disk_left_in_service_is_never_acknowledged(
    tmp_path: Path, recorder: SyncRecorder
) -> None:
    """Writes were acknowledged into the disks' page caches; then every disk left service
    (the watchdog, a failed write elsewhere). Nothing can make those writes durable any more,
    so an fsync must fail (EIO), not succeed by flushing no disk at all."""
    paths = [image(tmp_path, f"disk{i}.img", 24 * MiB) for i in range(2)]

    async def main() -> None:
        devices = [FileDevice(path) for path in paths]
        try:
            pool = await Pool.create("t", devices, media=["hdd"] * 2, slab_size=MiB,
                                     meta_slot_size=64 << 10)
            record = await pool.create_volume("v", MiB, LayoutSpec("mirror", 1, copies=2),
                                              "thin")
            volume = Volume(pool, record)
            await volume.write(0, os.urandom(64 * 1024))
            await pool.mark_failed(0, "test: gone")
            with pytest.raises(DeviceError):  # no disk can record the second failure
                await pool.mark_failed(1, "test: gone")
            assert not any(disk.usable for disk in pool.disks.values())
            recorder.calls.clear()
            with pytest.raises(DeviceError, match="no disk in service"):
                await volume.flush()
            assert recorder.calls == []
        finally:
            for dev in devices:
                dev.close()

    trio.run(main)
