"""A volume write's extent writes go out as one io_uring batch (ExtentIO.write_extents):
the happy path, a disk that fails its write, a disk that never answers, and a refused
batch. On pools of real image files, since memory disks never take the ring."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio
from uring_support import needs_ring
from uring_support import small_tmpfs as small_tmpfs_at

from blockspace.disks import uring
from blockspace.disks.devices import FileDevice, open_device
from blockspace.errors import HostSpaceError
from blockspace.geometry.layouts import LayoutSpec
from blockspace.pool.pool import Pool
from blockspace.volume.volume import Volume

MiB = 1 << 20


pytestmark = needs_ring


def images(where: list[Path], size: int = 24 * MiB) -> list[str]:
    paths = []
    for i, directory in enumerate(where):
        path = directory / f"disk{i}.img"
        path.write_bytes(b"")
        os.truncate(path, size)
        paths.append(str(path))
    return paths


async def make(paths: list[str], spec: LayoutSpec) -> tuple[Pool, Volume, list[FileDevice]]:
    devices = [open_device(path) for path in paths]
    pool = await Pool.create("t", devices, media=["hdd"] * len(devices), slab_size=MiB,
                             meta_slot_size=64 << 10)
    await pool.enable_intent_log()
    record = await pool.create_volume("v", 4 * spec.slab_data_size(MiB), spec, "thin")
    return pool, Volume(pool, record), devices


def count_batches(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Chains per Ring.run call, as they happen."""
    seen: list[int] = []
    real = uring.Ring.run

    async def run(self: uring.Ring, batch: uring.Batch) -> None:
        seen.append(len(batch.chains))
        await real(self, batch)

    monkeypatch.setattr(uring.Ring, "run", run)
    return seen


def test_a_striped_write_reaches_all_its_disks_in_one_batch_and_reads_back_after_reopen(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = images([tmp_path] * 4)
    batches = count_batches(monkeypatch)
    data = os.urandom(MiB // 2)

    async def main() -> None:
        pool, volume, devices = await make(paths, LayoutSpec("simple", 4, interleave=65536))
        await volume.write(0, os.urandom(4096))  # allocates the slab
        batches.clear()
        before = [dev._ring_writes for dev in devices]
        await volume.write(0, data)  # two rows of four columns: four extent writes
        assert batches == [4]
        assert [dev._ring_writes - n for dev, n in zip(devices, before, strict=True)] == [1] * 4
        await pool.flush()
        await pool.close_intent_log()
        for dev in devices:
            dev.close()
        pool2 = await Pool.open([open_device(path) for path in paths])
        volume2 = Volume(pool2, pool2.volume("v"))
        assert await volume2.read(0, len(data)) == data  # data and checksum entries landed
        assert volume2.statistics().degraded_reads == 0

    trio.run(main)


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    with small_tmpfs_at(tmp_path / "small", "3m") as where:
        yield where


def test_a_copy_whose_host_fills_up_fails_the_write_with_enospc_not_the_disk(
    tmp_path: Path, small_tmpfs: Path
) -> None:
    """The batch's chain for the image on a full tmpfs comes back short (ENOSPC); the careful
    path retries it and gets ENOSPC again: a full host is not a dead disk (issue 17), so the
    write fails with ENOSPC (it is not on every copy) and the disk stays in service."""
    paths = images([tmp_path, small_tmpfs])

    async def main() -> None:
        pool, volume, _ = await make(paths, LayoutSpec("mirror", 1, copies=2))
        data = os.urandom(4 * MiB)  # more than the 3 MiB tmpfs holds
        acknowledged = 0
        refused: HostSpaceError | None = None
        for offset in range(0, len(data), MiB):
            try:
                await volume.write(offset, data[offset : offset + MiB])
            except HostSpaceError as error:
                refused = error
                break
            acknowledged = offset + MiB
        assert refused is not None
        assert refused.errno == errno.ENOSPC
        assert acknowledged >= MiB
        full = pool.disks[1]
        assert full.record.state == "online"
        assert full.errors["write"] == 0
        assert 1 in pool.host_full
        assert pool.disks[0].record.state == "online"
        assert await volume.read(0, acknowledged) == data[:acknowledged]

    trio.run(main)


def test_a_disk_that_does_not_answer_in_time_is_failed_and_the_others_are_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stand-in for a hung disk: the ring completes the first chain of a batch and never
    the second. After the I/O timeout that disk is failed, its copy is not counted as
    written, and the write is acknowledged on the copy that answered."""
    paths = images([tmp_path] * 2)
    real = uring.Ring.run

    async def half_answered(self: uring.Ring, batch: uring.Batch) -> None:
        if len(batch.chains) < 2:
            await real(self, batch)
            return
        answered = uring.Batch(batch.chains[:1])
        await real(self, answered)
        batch.results[: len(answered.results)] = answered.results
        await trio.sleep_forever()

    async def main() -> None:
        pool, volume, _ = await make(paths, LayoutSpec("mirror", 1, copies=2))
        await volume.write(0, b"a" * 65536)
        pool.io_timeout = 0.5
        monkeypatch.setattr(uring.Ring, "run", half_answered)
        with trio.fail_after(5):
            await volume.write(0, b"b" * 65536)
        states = {disk_id: disk.record.state for disk_id, disk in pool.disks.items()}
        assert sorted(states.values()) == ["failed", "online"]
        hung = next(d for d, s in states.items() if s == "failed")
        assert "no answer to a write within 0.5s" in pool.disks[hung].record.state_reason
        monkeypatch.setattr(uring.Ring, "run", real)
        assert await volume.read(0, 65536) == b"b" * 65536

    trio.run(main)


@pytest.mark.parametrize("refusal", [
    lambda: OSError(errno.EINVAL, "too many pieces in one io_uring request"),
    lambda: OSError(errno.EBUSY, "io_uring_submit failed"),
])
def test_a_batch_the_ring_refuses_is_written_the_careful_way(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, refusal: Callable[[], OSError]
) -> None:
    paths = images([tmp_path] * 2)

    async def refuse(self: uring.Ring, batch: uring.Batch) -> None:
        raise refusal()

    async def main() -> None:
        pool, volume, devices = await make(paths, LayoutSpec("mirror", 1, copies=2))
        await volume.write(0, b"a" * 4096)
        monkeypatch.setattr(uring.Ring, "run", refuse)
        await volume.write(0, b"z" * 65536)
        assert all(disk.record.state == "online" for disk in pool.disks.values())
        for dev in devices:  # both copies written (by workers), checksums too
            assert dev.statistics().errors == 0
        assert await volume.read(0, 65536) == b"z" * 65536
        assert volume.statistics().degraded_reads == 0

    trio.run(main)
