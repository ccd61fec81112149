"""A full host file system under the images is not a dead disk (issue 17 item 3).

Sparse images on a host that fills up (`blockspace.testing.host_space`): the write that
needed room fails with ENOSPC, nothing is marked failed, reads and overwrites keep working,
`pool status` says what to do, and once there is room again writes succeed with every copy
consistent, without `disk online`.
"""

import errno

import pytest
import trio

from blockspace.admin.pools import pool_status
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
