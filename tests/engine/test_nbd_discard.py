"""NBD TRIM and WRITE_ZEROES give space back (blockspace/service/nbd.py -> `Volume.discard`),
with the server in-process on image files and real clients (qemu-io from qemu-utils, nbdcopy
from libnbd-bin) and the raw client of test_nbd_server.py for the NO_HOLE flag."""

from pathlib import Path

import trio

from blockspace.disks.faults import FaultSpec
from blockspace.service import nbd_protocol as wire
from tests.engine.test_nbd_server import (
    MIRROR,
    PARITY,
    SLAB,
    VOLUME_SIZE,
    MiB,
    RawClient,
    exported,
    need,
    run,
)


def test_qemu_io_discard_of_whole_slabs_gives_their_space_back(tmp_path: Path) -> None:
    """A 2+1 parity volume with 1 MiB slabs: 2 MiB of data per slab."""
    qemu_io = need("qemu-io")

    async def main() -> None:
        async with exported(tmp_path) as env:
            volume = env.volumes["vol"]
            size = volume.slab_data_size
            assert size == 2 * MiB
            await run(qemu_io, "-f", "raw", env.uri(), "-c", f"write -P 0x6b 0 {VOLUME_SIZE}",
                      "-c", "flush")
            assert len(volume.record.slabs) == VOLUME_SIZE // size
            free = sum(env.pool.allocator.free_map().values())
            # Slabs 1..4 whole, the last 4k of slab 0 and the first 4k of slab 5.
            start, length = size - 4096, 4 * size + 8192
            await run(qemu_io, "-f", "raw", env.uri(), "-c", f"discard {start} {length}",
                      "-c", f"read -P 0 {start} {length}", "-c", f"read -P 0x6b 0 {start}",
                      "-c", f"read -P 0x6b {start + length} {VOLUME_SIZE - start - length}")
            assert sorted(volume.record.slabs) == [0, 5, 6, 7]
            assert sum(env.pool.allocator.free_map().values()) == free + 4 * PARITY.width
            # WRITE_ZEROES (qemu-io write -z; -u lets it unmap) of slab 6 frees it too.
            await run(qemu_io, "-f", "raw", env.uri(), "-c", f"write -z -u {6 * size} {size}",
                      "-c", f"read -P 0 {6 * size} {size}")
            assert sorted(volume.record.slabs) == [0, 5, 7]
            # Written again: allocated afresh.
            await run(qemu_io, "-f", "raw", env.uri(), "-c", f"write -P 0x11 {2 * size} 4k",
                      "-c", f"read -P 0x11 {2 * size} 4k", "-c", f"read -P 0 {2 * size + 4096} 4k")
            assert sorted(volume.record.slabs) == [0, 2, 5, 7]

    trio.run(main)


def test_write_zeroes_with_no_hole_keeps_the_space(tmp_path: Path) -> None:
    async def main() -> None:
        async with exported(tmp_path, volumes=(("vol", 8 * SLAB, MIRROR),)) as env:
            volume = env.volumes["vol"]
            await volume.write(0, b"\x5a" * (2 * SLAB))
            client = await RawClient.go(env.socket)
            assert await client.call(wire.CMD_WRITE_ZEROES, 0, SLAB,
                                     flags=wire.CMD_FLAG_NO_HOLE) == (0, b"")
            assert sorted(volume.record.slabs) == [0, 1]
            assert await volume.read(0, SLAB) == bytes(SLAB)
            assert await client.call(wire.CMD_TRIM, SLAB, SLAB, flags=wire.CMD_FLAG_FUA) == (
                0, b"")
            assert sorted(volume.record.slabs) == [0]
            client.close()

    trio.run(main)


def test_a_discard_whose_commit_fails_answers_eio_and_unmaps_nothing(tmp_path: Path) -> None:
    async def main() -> None:
        async with exported(tmp_path, volumes=(("vol", 8 * SLAB, MIRROR),)) as env:
            volume = env.volumes["vol"]
            await volume.write(0, b"\x5a" * (2 * SLAB))
            client = await RawClient.go(env.socket)
            for device in env.devices:  # the metadata commit cannot land anywhere
                device.set_spec(FaultSpec(write_error=1.0))
            assert await client.call(wire.CMD_TRIM, SLAB, SLAB) == (wire.EIO, b"")
            assert sorted(volume.record.slabs) == [0, 1]
            client.close()

    trio.run(main)
