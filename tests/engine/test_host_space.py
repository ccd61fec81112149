"""A full host file system under the images is not a dead disk (issue 17 item 3).

Sparse images on a host that fills up (`blockspace.testing.host_space`): the write that
needed room fails with ENOSPC, nothing is marked failed, reads and overwrites keep working,
`pool status` says what to do, and once there is room again writes succeed with every copy
consistent, without `disk online`.
"""

import contextlib
import errno
import os
from pathlib import Path

import pytest
import trio
from uring_support import small_tmpfs

from blockspace.admin.pools import pool_status
from blockspace.disks.devices import open_device
from blockspace.errors import DeviceError, HostSpaceError
from blockspace.geometry.layouts import LayoutSpec
from blockspace.pool.pool import Pool
from blockspace.repair.scrub import scrub_slab
from blockspace.service import nbd_protocol as wire
from blockspace.service.fuse_ops import errno_of
from blockspace.service.nbd import error_value
from blockspace.testing.host_space import PAGE, HostFileSystem, SparseImage
from blockspace.testing.memory_device import MemoryDevice
from blockspace.volume.volume import Volume

MiB = 1 << 20
CHUNK = 256 << 10
LAYOUTS = {
    "mirror-2": LayoutSpec("mirror", 1, copies=2, interleave=16384),
    "parity-2+1": LayoutSpec("parity", 2, parity=1, interleave=16384),
}


def sparse(path: Path, size: int) -> None:
    with path.open("xb") as handle:
        handle.truncate(size)


def pattern(index: int, length: int = CHUNK) -> bytes:
    return bytes([(index * 37 + 11) % 251 + 1]) * length


async def make(spec: LayoutSpec, code: int) -> tuple[Pool, Volume, HostFileSystem]:
    host = HostFileSystem(1 << 40)
    devices = [SparseImage(host, 12 * MiB, path=f"/hosts/full/d{i}.img", code=code)
               for i in range(3)]
    pool = await Pool.create("h", devices, media=["hdd"] * 3, slab_size=MiB,
                             meta_slot_size=64 << 10)
    record = await pool.create_volume("v", 8 * MiB, spec, "thin")
    await pool.enable_intent_log()  # as the daemon runs it
    return pool, Volume(pool, record), host


async def scrub_totals(volume: Volume) -> tuple[int, int, int]:
    errors = mismatches = unrecoverable = 0
    for slab in sorted(volume.record.slabs):
        report = await scrub_slab(volume, slab)
        errors += report.checksum_errors
        mismatches += report.mismatches
        unrecoverable += len(report.unrecoverable)
    return errors, mismatches, unrecoverable


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_a_full_host_fails_the_write_with_enospc_and_no_disk(name: str, code: int) -> None:
    async def scenario() -> None:
        pool, volume, host = await make(LAYOUTS[name], code)
        # Room for a few chunks' pages, not a whole number of them: one write finds its
        # copies (columns) partly written when the room runs out.
        host.capacity = host.used + 3 * MiB + 5 * PAGE
        model = bytearray(volume.size)
        failed_at = None
        refused: HostSpaceError | None = None
        for index in range(volume.size // CHUNK):
            try:
                await volume.write(index * CHUNK, pattern(index))
            except HostSpaceError as error:
                failed_at, refused = index, error
                break
            model[index * CHUNK : (index + 1) * CHUNK] = pattern(index)
        assert failed_at is not None
        assert failed_at > 2
        assert refused is not None
        assert errno_of(refused) == errno.ENOSPC  # what FUSE answers
        assert error_value(refused) == wire.ENOSPC  # what NBD answers

        # Nothing is held against the disks; status says what is wrong and what to do.
        assert {d.record.state for d in pool.disks.values()} == {"online"}
        assert all(d.errors == {"read": 0, "write": 0, "checksum": 0}
                   for d in pool.disks.values())
        status = pool_status(pool)
        assert status["health"] == "online"
        assert status["actions"]
        assert all("host file system under /hosts/full/d" in a and "is full: free space there"
                   in a for a in status["actions"])
        assert any(d["host_full"] for d in status["disks"])

        # Reads of acknowledged data, and overwrites needing no new room, keep working.
        written = failed_at * CHUNK
        assert await volume.read(0, written) == bytes(model[:written])
        await volume.write(0, pattern(99))
        model[:CHUNK] = pattern(99)
        assert await volume.read(0, CHUNK) == pattern(99)
        # The refused write left, per block, the old contents (zeros) or the new: nothing else.
        torn = await volume.read(written, CHUNK)
        for block in range(0, CHUNK, 4096):
            assert torn[block : block + 4096] in (bytes(4096), pattern(failed_at, 4096))
        with pytest.raises(HostSpaceError):  # still no room
            await volume.write(written, pattern(failed_at))

        # Room again: writes succeed, no `disk online` needed, the condition clears.
        host.capacity += 64 * MiB
        for index in range(failed_at, volume.size // CHUNK):
            await volume.write(index * CHUNK, pattern(index))
            model[index * CHUNK : (index + 1) * CHUNK] = pattern(index)
        await volume.flush()
        assert not pool.host_full
        assert not pool_status(pool)["actions"]
        assert await volume.read(0, volume.size) == bytes(model)
        assert not volume.pending_resync  # the half-done regions were resynced
        assert (await scrub_totals(volume))[2] == 0
        assert await scrub_totals(volume) == (0, 0, 0)  # every copy and parity consistent
        # Full redundancy: any one disk lost, everything acknowledged still reads back.
        lost = pool.disks[0].device
        assert isinstance(lost, MemoryDevice)
        lost.failed = True
        assert await volume.read(0, volume.size) == bytes(model)

    trio.run(scenario)


def test_a_new_slab_without_host_room_is_not_placed_and_the_pool_stays_online() -> None:
    async def scenario() -> None:
        pool, volume, host = await make(LAYOUTS["mirror-2"], errno.ENOSPC)
        await volume.write(0, pattern(1))
        host.capacity = host.used  # not a page more
        with pytest.raises(DeviceError) as caught:
            await volume.write(4 * MiB, pattern(2))  # a new slab: its first write
        assert errno_of(caught.value) == errno.ENOSPC
        assert {d.record.state for d in pool.disks.values()} == {"online"}
        assert await volume.read(0, CHUNK) == pattern(1)
        host.capacity += 16 * MiB
        await volume.write(4 * MiB, pattern(2))
        assert await volume.read(4 * MiB, CHUNK) == pattern(2)
        assert not pool.host_full

    trio.run(scenario)


@pytest.mark.parametrize(("code", "host_fault"), [(errno.ENOSPC, True), (errno.EDQUOT, True),
                                                  (errno.EIO, False)])
def test_a_file_device_tells_a_full_host_from_a_failing_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int, host_fault: bool
) -> None:
    path = tmp_path / "d.img"
    sparse(path, MiB)
    device = open_device(str(path))
    try:
        def refuse(*_args: object) -> int:
            raise OSError(code, os.strerror(code))

        monkeypatch.setattr(os, "pwrite", refuse)
        with pytest.raises(DeviceError) as caught:
            device.write_sync(0, b"x" * 4096)
        assert isinstance(caught.value, HostSpaceError) is host_fault
        assert errno_of(caught.value) == (errno.ENOSPC if host_fault else errno.EIO)
        assert caught.value.os_errno == code  # type: ignore[attr-defined]
    finally:
        device.close()


def test_the_metadata_area_of_a_sparse_image_is_allocated_at_create(tmp_path: Path) -> None:
    """Commits and intent records go to room the host gave at `pool create` (and `disk
    add`): a full host file system cannot stop the pool from recording its state."""
    with small_tmpfs(tmp_path / "host", "64m") as host:
        paths = []
        for index in range(3):
            path = host / f"d{index}.img"
            sparse(path, 32 * MiB)
            paths.append(path)

        async def scenario() -> None:
            devices = [open_device(str(path)) for path in paths]
            pool = await Pool.create("h", devices, media=["hdd"] * 3, slab_size=MiB)
            geometry = pool.disks[0].geometry
            for path in paths:
                assert os.stat(path).st_blocks * 512 >= geometry.data_start + 4096
            spare = host / "spare.img"
            sparse(spare, 32 * MiB)
            filler = host / "filler"
            with filler.open("wb") as handle:  # the rest of the tmpfs
                with contextlib.suppress(OSError):
                    while True:
                        handle.write(bytes(MiB))
            try:
                # Every disk's metadata and intent slots are there: commits still land.
                await pool.create_volume("v", 4 * MiB, LAYOUTS["mirror-2"], "thin")
                await pool.enable_intent_log()
                assert {d.record.state for d in pool.disks.values()} == {"online"}
                # A disk added now cannot get room for its own: refused, nothing failed.
                extra = open_device(str(spare))
                with pytest.raises(HostSpaceError):
                    await pool.add_disk(extra, "hdd")
                extra.close()
                assert len(pool.disks) == 3
                assert {d.record.state for d in pool.disks.values()} == {"online"}
            finally:
                pool.close()

        trio.run(scenario)


async def fill_until_refused(volume: Volume, host: HostFileSystem) -> tuple[int, bytearray]:
    """Write chunks until the host is full; (index of the refused chunk, model)."""
    host.capacity = host.used + 3 * MiB + 5 * PAGE
    model = bytearray(volume.size)
    for index in range(volume.size // CHUNK):
        try:
            await volume.write(index * CHUNK, pattern(index))
        except HostSpaceError:
            return index, model
        model[index * CHUNK : (index + 1) * CHUNK] = pattern(index)
    raise AssertionError("the host never filled up")


def test_a_refused_mirror_write_is_resynced_before_its_complete_copy_is_trusted() -> None:
    """The refused write reached one copy whole and the other in part: with the whole copy's
    disk lost before anything else touched the range, the range still reads back, per block,
    as the old or the new contents. Its regions waited for a resync like an unclean stop's,
    instead of a read trusting the whole copy and leaving the torn one as it was."""
    async def scenario() -> None:
        pool, volume, host = await make(LAYOUTS["mirror-2"], errno.ENOSPC)
        failed_at, model = await fill_until_refused(volume, host)
        offset = failed_at * CHUNK
        slab, start = divmod(offset, volume.slab_data_size)
        new = pattern(failed_at)
        whole = []
        for disk_id, extent in volume.record.slabs[slab]:
            device = pool.disks[disk_id].device
            assert isinstance(device, MemoryDevice)
            at = pool.extent_offset(disk_id, extent) + start
            whole.append((device.data[at : at + CHUNK] == new, device))
        assert sorted(done for done, _ in whole) == [False, True]  # one copy torn
        host.capacity += 64 * MiB  # room again; the refused range is not written again
        next(device for done, device in whole if done).failed = True
        seen = await volume.read(offset, CHUNK)
        for block in range(0, CHUNK, 4096):
            assert seen[block : block + 4096] in (bytes(4096), pattern(failed_at, 4096))
        assert await volume.read(0, offset) == bytes(model[:offset])

    trio.run(scenario)


@pytest.mark.parametrize("position", [0, 1, 2])
def test_a_refused_parity_write_reads_the_same_after_a_disk_is_lost(position: int) -> None:
    """Parity: once a read went through the refused range (which resyncs it first: parity
    recomputed from the data), losing any one disk changes nothing read there. A disk lost
    before that resync is the write hole of an unclean stop followed by a disk loss (README,
    "Disks and failures")."""
    async def scenario() -> None:
        pool, volume, host = await make(LAYOUTS["parity-2+1"], errno.ENOSPC)
        failed_at, model = await fill_until_refused(volume, host)
        offset = failed_at * CHUNK
        host.capacity += 64 * MiB
        first = await volume.read(offset, CHUNK)
        for block in range(0, CHUNK, 4096):
            assert first[block : block + 4096] in (bytes(4096), pattern(failed_at, 4096))
        disk_id, _ = volume.record.slabs[offset // volume.slab_data_size][position]
        lost = pool.disks[disk_id].device
        assert isinstance(lost, MemoryDevice)
        lost.failed = True
        assert await volume.read(offset, CHUNK) == first
        assert await volume.read(0, offset) == bytes(model[:offset])

    trio.run(scenario)
