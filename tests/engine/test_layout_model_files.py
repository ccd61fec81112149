"""The layout model test of tests/engine/test_volume.py, on image files.

Memory disks never take the cached read fast path (`read_now` is for the page cache:
`preadv(RWF_NOWAIT)`), so the in-process model test proves nothing about it. Here the same
random unaligned writes and reads, the same lost or rotten disks, run on image files in
tmp_path, and each example also proves that reads compared with the model were served from
the page cache (the devices' `inline_reads`). Rot is written into the images through the
page cache, where the fast path reads it: it must be caught there. A disk to be failed is
wrapped in the fault-injection layer (what a mount with --allow-fault-injection does) and
made dead; the others are plain `FileDevice`s, as a normal mount has them.
"""

import os
import random
from pathlib import Path

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blockspace.disks.devices import Device, FileDevice
from blockspace.disks.faults import FaultSpec, FaultyDevice
from blockspace.pool.pool import Pool
from blockspace.volume.volume import Volume

from .test_volume import DISK, LAYOUTS, SLAB, MiB, model_step, read_op, write_op

DISKS = 5


def flip_file_bytes(path: Path, rng: random.Random, count: int) -> None:
    """`test_volume.flip_bytes` on an image file: bitrot past the labels and metadata,
    written through the page cache the pool's reads are served from."""
    data_start = 1 * MiB
    fd = os.open(path, os.O_RDWR)
    try:
        for _ in range(count):
            at = rng.randrange(data_start, DISK - 4096)
            old = os.pread(fd, 1, at)[0]
            os.pwrite(fd, bytes([old ^ (1 << rng.randrange(8))]), at)
    finally:
        os.close(fd)


def inline_reads(devices: list[Device]) -> int:
    """Reads served at once from the page cache (`preadv(RWF_NOWAIT)`), on all disks."""
    return sum(device.statistics().inline_reads for device in devices)


def slab_ranges(volume: Volume) -> list[tuple[int, int]]:
    """The volume bytes of each allocated slab: the most one fast-path read can cover."""
    ranges = []
    for slab in sorted(volume.record.slabs):
        start = slab * volume.slab_data_size
        ranges.append((start, min(start + volume.slab_data_size, volume.size)))
    return ranges


@pytest.mark.parametrize("name", sorted(LAYOUTS))
@settings(max_examples=15, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(
    ops=st.lists(st.one_of(write_op, read_op), min_size=1, max_size=12),
    failures=st.integers(0, 3),
    fault=st.sampled_from(["fail", "corrupt"]),
    seed=st.integers(0, 2**32),
)
def test_layout_matches_bytearray_model_on_image_files(
    tmp_path: Path, name: str, ops: list[tuple[str, int, int, int]], failures: int,
    fault: str, seed: int
) -> None:
    spec = LAYOUTS[name]
    rng = random.Random(seed)
    lost = rng.sample(range(DISKS), min(failures, spec.tolerance))
    paths = [tmp_path / f"d{i}.img" for i in range(DISKS)]
    for path in paths:  # fresh sparse images for each example
        path.write_bytes(b"")
        os.truncate(path, DISK)

    async def scenario() -> None:
        devices: list[Device] = [
            FaultyDevice(FileDevice(str(path))) if fault == "fail" and index in lost
            else FileDevice(str(path))
            for index, path in enumerate(paths)
        ]
        pool = await Pool.create("test", devices, media=["hdd"] * DISKS, slab_size=SLAB,
                                 meta_slot_size=64 << 10)
        record = await pool.create_volume("vol", spec.slab_data_size(SLAB) * 5 // 2, spec,
                                          "thin")
        volume = Volume(pool, record)
        model = bytearray(volume.size)
        apply = model_step(volume, model)

        try:
            for op in ops:
                await apply(*op)
            # The fast path, proven taken: once checksum pages and data are cached, each
            # allocated slab read whole is served from the page cache, and matches.
            assert await volume.read(0, volume.size) == model
            for start, end in slab_ranges(volume):
                before = inline_reads(devices)
                assert await volume.read(start, end - start) == model[start:end]
                assert inline_reads(devices) > before, f"bytes {start}-{end} not from the cache"
            # Lose or rot up to `tolerance` disks; every byte must still read as the model:
            # slab by slab first (a read within one slab tries the fast path, which meets
            # the rot in the page cache), then all at once.
            for index in lost:
                if fault == "fail":
                    faulty = devices[index]
                    assert isinstance(faulty, FaultyDevice)
                    faulty.set_spec(FaultSpec(dead=True))
                else:
                    flip_file_bytes(paths[index], rng, count=200)
            for start, end in slab_ranges(volume):
                assert await volume.read(start, end - start) == model[start:end]
            assert await volume.read(0, volume.size) == model
            if fault == "corrupt":  # the first read healed what it found: a second finds nothing
                errors = [dict(d.errors) for d in pool.disks.values()]
                assert await volume.read(0, volume.size) == model
                assert [dict(d.errors) for d in pool.disks.values()] == errors
            for op in ops:  # and the degraded volume keeps serving writes
                await apply(*op)
            assert await volume.read(0, volume.size) == model
        finally:
            pool.close()
            for device in devices:
                device.close()

    trio.run(scenario)
