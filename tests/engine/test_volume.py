"""Every layout against a plain bytearray model, in-process on memory disks.

Random unaligned writes and reads across row and slab boundaries, then 0..tolerance disks
failed, and the volume must still read exactly what the model holds (and keep writing).
"""

import os
import random
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blockspace.disks.devices import FileDevice
from blockspace.errors import InvalidInput, NoSpace, Unrecoverable
from blockspace.geometry.layouts import LayoutSpec, code_position, data_positions, row_start
from blockspace.pool.pool import Pool
from blockspace.testing.memory_device import MemoryDevice
from blockspace.volume.pieces import BLOCK
from blockspace.volume.volume import Volume

MiB = 1 << 20
SLAB = 1 * MiB
DISK = 12 * MiB

LAYOUTS = {
    "simple-3": LayoutSpec("simple", 3, interleave=16384),
    "mirror-2": LayoutSpec("mirror", 1, copies=2, interleave=16384),
    "mirror-3": LayoutSpec("mirror", 1, copies=3, interleave=16384),
    "mirror-2x2": LayoutSpec("mirror", 2, copies=2, interleave=8192),
    "parity-1": LayoutSpec("parity", 3, parity=1, interleave=8192),
    "parity-2": LayoutSpec("parity", 2, parity=2, interleave=16384),
    "parity-2-wide": LayoutSpec("parity", 3, parity=2, interleave=4096),
}


async def make_volume(
    spec: LayoutSpec, *, disks: int = 5, size: int | None = None, provisioning: str = "thin"
) -> tuple[Pool, Volume, list[MemoryDevice]]:
    devices = [MemoryDevice(DISK, path=f"mem{i}") for i in range(disks)]
    pool = await Pool.create(
        "test", devices, media=["hdd"] * disks, slab_size=SLAB, meta_slot_size=64 << 10
    )
    if size is None:
        size = spec.slab_data_size(SLAB) * 5 // 2  # two and a half slabs
    record = await pool.create_volume("vol", size, spec, provisioning)
    return pool, Volume(pool, record), devices


def flip_bytes(device: MemoryDevice, rng: random.Random, count: int) -> None:
    """Bitrot behind the pool's back: flip bytes anywhere past the labels and metadata."""
    data_start = 1 * MiB
    for _ in range(count):
        device.data[rng.randrange(data_start, len(device.data) - 4096)] ^= 1 << rng.randrange(8)


write_op = st.tuples(st.just("w"), st.integers(0, 10**9), st.integers(1, 150_000), st.integers())
read_op = st.tuples(st.just("r"), st.integers(0, 10**9), st.integers(1, 150_000), st.integers())


ModelStep = Callable[[str, int, int, int], Awaitable[None]]


def model_step(volume: Volume, model: bytearray) -> ModelStep:
    """One op of the model tests: a write applied to the volume and the model alike, or a read
    that must match the model. Offsets and lengths are folded into the volume."""

    async def apply(kind: str, offset: int, length: int, data_seed: int) -> None:
        offset %= volume.size
        length = min(length, volume.size - offset)
        if kind == "w":
            data = random.Random(data_seed).randbytes(length)
            await volume.write(offset, data)
            model[offset : offset + length] = data
        else:
            assert await volume.read(offset, length) == model[offset : offset + length]

    return apply


@pytest.mark.parametrize("name", sorted(LAYOUTS))
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    ops=st.lists(st.one_of(write_op, read_op), min_size=1, max_size=12),
    failures=st.integers(0, 3),
    fault=st.sampled_from(["fail", "corrupt"]),
    seed=st.integers(0, 2**32),
)
def test_layout_matches_bytearray_model(
    name: str, ops: list[tuple[str, int, int, int]], failures: int, fault: str, seed: int
) -> None:
    spec = LAYOUTS[name]

    async def scenario() -> None:
        pool, volume, devices = await make_volume(spec)
        model = bytearray(volume.size)
        rng = random.Random(seed)
        apply = model_step(volume, model)

        for op in ops:
            await apply(*op)
        # Lose or rot up to `tolerance` disks (a slab has one extent per disk, so no stripe
        # loses more than that); every byte must still read as the model says.
        lost = rng.sample(range(len(devices)), min(failures, spec.tolerance))
        for index in lost:
            if fault == "fail":
                devices[index].failed = True
            else:
                flip_bytes(devices[index], rng, count=200)
        assert await volume.read(0, volume.size) == model
        if fault == "corrupt":  # the first read healed what it found: a second finds nothing
            errors = [dict(d.errors) for d in pool.disks.values()]
            assert await volume.read(0, volume.size) == model
            assert [dict(d.errors) for d in pool.disks.values()] == errors
        for op in ops:  # and the degraded volume keeps serving writes
            await apply(*op)
        assert await volume.read(0, volume.size) == model
        pool.close()

    trio.run(scenario)


@pytest.mark.parametrize("name", ["simple-3", "mirror-2", "parity-1"])
def test_unwritten_space_reads_zeros_and_zero_writes_do_not_allocate(name: str) -> None:
    async def scenario() -> None:
        _, volume, _ = await make_volume(LAYOUTS[name])
        assert await volume.read(0, 65536) == bytes(65536)
        await volume.write(0, bytes(volume.slab_data_size))  # a whole slab of zeros
        assert volume.record.slabs == {}
        await volume.write(4096, b"x" * 100)
        assert set(volume.record.slabs) == {0}
        # the rest of the newly allocated slab reads as zeros
        data = await volume.read(0, volume.slab_data_size)
        assert data[4096:4196] == b"x" * 100
        assert data.count(0) == len(data) - 100

    trio.run(scenario)


def test_beyond_tolerance_reads_fail_with_unrecoverable_not_wrong_bytes() -> None:
    async def scenario() -> None:
        _, volume, devices = await make_volume(LAYOUTS["parity-1"], disks=4)
        await volume.write(0, b"a" * 300_000)
        devices[0].failed = True
        devices[1].failed = True
        with pytest.raises(Unrecoverable):
            await volume.read(0, 300_000)

    trio.run(scenario)


def test_a_parity_write_beyond_tolerance_fails_with_unrecoverable() -> None:
    async def scenario() -> None:
        _, volume, devices = await make_volume(LAYOUTS["parity-1"], disks=4)
        await volume.write(0, b"a" * 300_000)
        devices[0].failed = True
        await volume.write(0, b"b" * 300_000)  # one disk out: within tolerance, degraded
        assert await volume.read(0, 300_000) == b"b" * 300_000
        devices[1].failed = True
        rows = 12 * 3 * 8192  # whole rows: no old data to read, the writes themselves fail
        with pytest.raises(Unrecoverable, match="slab 0 rows 0-11 are unavailable"):
            await volume.write(0, b"c" * rows)

    trio.run(scenario)


def test_parity_full_stripe_write_skips_reads() -> None:
    async def scenario() -> None:
        spec = LAYOUTS["parity-1"]
        _, volume, devices = await make_volume(spec, disks=4)
        await volume.write(0, b"\1" * 4096)  # allocate the slab
        before = [d.statistics().reads for d in devices]
        row = spec.interleave * spec.columns
        await volume.write(row, random.randbytes(row * 4))  # four whole rows
        assert [d.statistics().reads for d in devices] == before

    trio.run(scenario)


class RecordingDevice(MemoryDevice):
    """A memory disk that notes the (offset, length) of every read it serves."""

    def __init__(self, size: int, path: str) -> None:
        super().__init__(size, path)
        self.read_log: list[tuple[int, int]] = []

    def read_sync(self, offset: int, length: int) -> bytes:
        self.read_log.append((offset, length))
        return super().read_sync(offset, length)


def test_parity_partial_row_write_reads_exactly_the_rows_other_data_fragments() -> None:
    """A write of whole blocks into one column of a parity row (no partial-block merge) must
    read the same byte range of the row's other data columns, and nothing else, to encode
    the new parity: the read-modify-write itself, seen at the device offsets it reads."""

    async def scenario() -> None:
        spec = LAYOUTS["parity-1"]  # 3 data + 1 parity, 8 KiB units
        devices = [RecordingDevice(DISK, path=f"mem{i}") for i in range(spec.width)]
        pool = await Pool.create("test", devices, media=["hdd"] * spec.width,
                                 slab_size=SLAB, meta_slot_size=64 << 10)
        volume = Volume(pool, await pool.create_volume("vol", 2 * SLAB, spec, "thin"))
        row_bytes = spec.interleave * spec.columns
        model = bytearray(random.Random(1).randbytes(row_bytes * 16))
        await volume.write(0, model)  # sixteen whole rows: encoded without a read
        extents = volume.record.slabs[0]

        def recorder(disk_id: int) -> RecordingDevice:
            device = pool.disks[disk_id].device
            assert isinstance(device, RecordingDevice)
            return device

        def data_reads() -> dict[int, list[tuple[int, int]]]:
            """Each disk's reads inside the data part of its extent of the slab (not the
            labels, metadata or checksum areas)."""
            reads = {}
            for disk_id, extent in extents:
                base = pool.extent_offset(disk_id, extent)
                reads[disk_id] = [(offset, length) for offset, length
                                  in recorder(disk_id).read_log if base <= offset < base + SLAB]
            return reads

        assert data_reads() == {disk_id: [] for disk_id, _ in extents}
        row, column, unit_offset = 10, 1, BLOCK  # the second block of column 1's unit
        new = random.Random(2).randbytes(BLOCK)
        where = row * row_bytes + column * spec.interleave + unit_offset
        await volume.write(where, new)
        model[where : where + BLOCK] = new

        expected: dict[int, list[tuple[int, int]]] = {disk_id: [] for disk_id, _ in extents}
        for other in range(spec.columns):
            if other != column:
                disk_id, extent = extents[code_position(spec, row, other)]
                start = pool.extent_offset(disk_id, extent) + row_start(spec, row) + unit_offset
                expected[disk_id].append((start, BLOCK))
        assert data_reads() == expected
        # The parity written is the new row's: with column 0's disk gone, the row rebuilt
        # from the others reads as the model.
        recorder(extents[code_position(spec, row, 0)][0]).failed = True
        assert await volume.read(row * row_bytes, row_bytes) == (
            model[row * row_bytes : (row + 1) * row_bytes])

    trio.run(scenario)


def test_thin_volume_out_of_space_fails_only_that_write() -> None:
    async def scenario() -> None:
        spec = LayoutSpec("mirror", 1, copies=2)
        # 2 disks of 12 MiB hold ~10 extents each: a 64 MiB thin volume cannot fill.
        pool, volume, _ = await make_volume(spec, disks=2, size=64 * MiB)
        written = 0
        failure: NoSpace | None = None
        while failure is None and written < volume.size:
            try:
                await volume.write(written, b"y" * SLAB)
                written += SLAB
            except NoSpace as error:
                failure = error
        assert failure is not None
        assert written > 0
        assert await volume.read(0, written) == b"y" * written
        await volume.write(0, b"z" * 4096)  # allocated space still takes writes
        assert await volume.read(0, 4096) == b"z" * 4096
        assert pool.metadata.generation > 0

    trio.run(scenario)


def test_fixed_volume_reserves_every_slab_up_front() -> None:
    async def scenario() -> None:
        pool, volume, _ = await make_volume(LAYOUTS["mirror-2"], provisioning="fixed")
        assert len(volume.record.slabs) == 3
        with pytest.raises(NoSpace):
            await pool.create_volume("huge", 100 * MiB, LAYOUTS["mirror-2"], "fixed")
        assert [v.name for v in pool.metadata.volumes] == ["vol"]

    trio.run(scenario)


def test_out_of_range_io_is_rejected() -> None:
    async def scenario() -> None:
        _, volume, _ = await make_volume(LAYOUTS["simple-3"])
        with pytest.raises(InvalidInput):
            await volume.read(volume.size - 10, 20)
        with pytest.raises(InvalidInput):
            await volume.write(-1, b"x")

    trio.run(scenario)


def test_metadata_survives_reopen_and_picks_newest_generation() -> None:
    async def scenario() -> None:
        pool, volume, devices = await make_volume(LAYOUTS["parity-2"])
        await volume.write(123_456, b"persist" * 1000)
        generation = pool.metadata.generation
        reopened = await Pool.open(devices)
        assert reopened.metadata.generation == generation
        again = Volume(reopened, reopened.volume("vol"))
        assert await again.read(123_456, 7000) == b"persist" * 1000
        # one disk missing: still opens (metadata is on every disk), still reads
        partial = await Pool.open(devices[1:])
        assert await Volume(partial, partial.volume("vol")).read(123_456, 7000) == (
            b"persist" * 1000
        )

    trio.run(scenario)


def _image_files(tmp_path: Path, count: int) -> list[str]:
    paths = []
    for i in range(count):
        path = tmp_path / f"d{i}.img"
        path.write_bytes(b"")
        os.truncate(path, 32 * MiB)
        paths.append(str(path))
    return paths


async def _file_volume(
    paths: list[str], spec: LayoutSpec
) -> tuple[Pool, Volume, list[FileDevice]]:
    """A 2 MiB volume on a pool of image files: reads can be served from the page cache."""
    devices = [FileDevice(p) for p in paths]
    pool = await Pool.create("c", devices, media=["hdd"] * len(devices), slab_size=MiB,
                             meta_slot_size=64 << 10)
    return pool, Volume(pool, await pool.create_volume("v", 2 * MiB, spec, "thin")), devices


@pytest.mark.parametrize("spec", [LayoutSpec("mirror", 1, copies=2),
                                  LayoutSpec("mirror", 2, copies=2, interleave=16384),
                                  LayoutSpec("parity", 2, parity=1)],
                         ids=["mirror", "mirror-2-columns", "parity"])
def test_reads_from_the_page_cache_are_still_verified(tmp_path: Path, spec: LayoutSpec) -> None:
    """On image files a read is served at once from the page cache (no worker hop); rot
    written into an image behind the daemon's back must still be caught there and healed,
    in the first data column and in the last (a request's columns are verified together)."""
    paths = _image_files(tmp_path, spec.width)

    async def scenario() -> None:
        pool, volume, devices = await _file_volume(paths, spec)
        data = random.Random(3).randbytes(256 << 10)
        await volume.write(0, data)
        assert await volume.read(0, len(data)) == data  # warm: entries and data cached
        for column in sorted({0, spec.columns - 1}):
            inline = sum(d.statistics().inline_reads for d in devices)
            healed = volume.statistics().healed_blocks
            position = data_positions(spec, 0, column)[0]  # the copy row 0 is read from
            disk_id, extent = volume.record.slabs[0][position]
            at = pool.extent_offset(disk_id, extent) + 8192
            fd = os.open(paths[disk_id], os.O_WRONLY)  # same page cache as the device
            os.pwrite(fd, b"\xff" * 4096, at)
            os.close(fd)
            assert await volume.read(0, len(data)) == data
            assert sum(d.statistics().inline_reads for d in devices) > inline
            assert volume.statistics().healed_blocks > healed, f"column {column}"
            assert devices[disk_id].read_sync(at, 4096) != b"\xff" * 4096
        for device in devices:
            device.close()

    trio.run(scenario)


@pytest.mark.parametrize("spec", [LayoutSpec("simple", 3, interleave=8192),
                                  LayoutSpec("mirror", 2, copies=2, interleave=8192),
                                  LayoutSpec("parity", 3, parity=1, interleave=8192),
                                  LayoutSpec("parity", 2, parity=2, interleave=4096)],
                         ids=["simple-3", "mirror-2", "parity-1", "parity-2"])
def test_cached_reads_across_rows_and_columns_match_what_was_written(
    tmp_path: Path, spec: LayoutSpec
) -> None:
    """Reads served at once from memory gather a request from several columns and rows (for
    parity, one span per disk; whole blocks straight into the reply buffer); random ones,
    unaligned and block-aligned, must match a bytearray model."""
    paths = _image_files(tmp_path, spec.width)

    async def scenario() -> None:
        pool, volume, devices = await _file_volume(paths, spec)
        rng = random.Random(5)
        model = bytearray(rng.randbytes(volume.size))
        await volume.write(0, model)
        await volume.read(0, volume.size)  # warm: entries cached
        inline = sum(d.statistics().inline_reads for d in devices)
        for _ in range(200):
            offset = rng.randrange(volume.size)
            length = rng.randint(1, min(300_000, volume.size - offset))
            if rng.random() < 0.5:  # whole blocks, as the kernel asks
                offset, length = offset // 4096 * 4096, -(-length // 4096) * 4096
                length = min(length, volume.size - offset)
            assert await volume.read(offset, length) == model[offset : offset + length]
        assert sum(d.statistics().inline_reads for d in devices) > inline + 200
        assert volume.statistics().degraded_reads == 0
        for device in devices:
            device.close()

    trio.run(scenario)


def test_a_small_parity_write_never_encodes_from_a_rotten_fragment(tmp_path: Path) -> None:
    """A partial-row write reads the row's other fragments to encode the new parity; with
    everything in the page cache they are taken at once, but still verified: rot in one of
    them must be caught and healed first, or the new parity would carry the rot."""
    spec = LayoutSpec("parity", 3, parity=1, interleave=8192)
    paths = _image_files(tmp_path, spec.width)

    async def scenario() -> None:
        pool, volume, devices = await _file_volume(paths, spec)
        row = random.Random(9).randbytes(3 * 8192)
        await volume.write(0, row)
        assert await volume.read(0, len(row)) == row  # warm: entries and data cached
        disk_id, extent = volume.record.slabs[0][code_position(spec, 0, 1)]
        fd = os.open(paths[disk_id], os.O_WRONLY)  # column 1, behind the daemon's back
        os.pwrite(fd, b"\xee" * 4096, pool.extent_offset(disk_id, extent))
        os.close(fd)
        await volume.write(0, b"n" * 4096)  # column 0 only: column 1 is read to encode
        expected = b"n" * 4096 + row[4096:]
        assert await volume.read(0, len(row)) == expected
        assert volume.statistics().healed_blocks >= 1
        # Column 1 was rewritten from the parity, and the parity encodes the good data: with
        # column 1's disk gone the row still rebuilds correctly.
        await pool.mark_failed(disk_id, "test")
        assert await volume.read(0, len(row)) == expected
        for device in devices:
            device.close()

    trio.run(scenario)


def test_a_cached_read_never_returns_a_copy_older_than_another(tmp_path: Path) -> None:
    """Mirror on image files: a write that reached only the second copy (as a torn write
    would leave it) must win over the preferred copy, even when both are cached."""
    from blockspace.geometry.layouts import data_positions
    from blockspace.ondisk.checksums import entries_for

    spec = LayoutSpec("mirror", 1, copies=2)
    paths = _image_files(tmp_path, 2)

    async def scenario() -> None:
        pool, volume, devices = await _file_volume(paths, spec)
        old = random.Random(4).randbytes(64 << 10)
        await volume.write(0, old)
        assert await volume.read(0, 4096) == old[:4096]  # both copies' entries cached
        extents = volume.record.slabs[0]
        _, second = data_positions(spec, 0, 0)
        disk_id, extent = extents[second]
        new = random.Random(5).randbytes(4096)
        await pool.checksums.write(disk_id, extent, 0, entries_for(new, seq=pool.next_seq()),
                                   data=(pool.extent_offset(disk_id, extent), new))
        assert await volume.read(0, 4096) == new
        assert await volume.read(0, 8192) == new + old[4096:8192]
        for device in devices:
            device.close()

    trio.run(scenario)
