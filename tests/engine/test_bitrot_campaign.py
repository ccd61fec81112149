"""The long bitrot campaign (not in the default run): `make test-slow`, or
`.venv/bin/python -m pytest -m slow tests/test_bitrot_campaign.py -q`.

Round after round on every layout: random writes against a bytearray model, then rot of up
to the layout's tolerance of disks (bytes flipped anywhere in their data areas, checksum
areas included), a full read that must equal the model, a scrub that must find no
unrecoverable range, and a second scrub that must find nothing at all.
"""

import random

import pytest
import trio

from blockspace.geometry.layouts import LayoutSpec
from blockspace.pool.pool import Pool
from blockspace.repair.scrub import scrub_slab
from blockspace.testing.memory_device import MemoryDevice
from blockspace.volume.volume import Volume

MiB = 1 << 20
ROUNDS = 40
LAYOUTS = {
    "simple-3": LayoutSpec("simple", 3, interleave=16384),
    "mirror-2": LayoutSpec("mirror", 1, copies=2, interleave=16384),
    "mirror-3": LayoutSpec("mirror", 1, copies=3, interleave=16384),
    "parity-1": LayoutSpec("parity", 3, parity=1, interleave=16384),
    "parity-2": LayoutSpec("parity", 3, parity=2, interleave=8192),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_bitrot_campaign(name: str) -> None:
    spec = LAYOUTS[name]

    async def campaign() -> None:
        rng = random.Random(name)
        devices = [MemoryDevice(16 * MiB, path=f"mem{i}") for i in range(6)]
        pool = await Pool.create("c", devices, media=["hdd"] * 6, slab_size=MiB,
                                 meta_slot_size=64 << 10)
        record = await pool.create_volume("v", 3 * spec.slab_data_size(MiB), spec, "thin")
        volume = Volume(pool, record)
        model = bytearray(volume.size)
        flipped = 0
        for _ in range(ROUNDS):
            for _ in range(rng.randrange(1, 8)):
                offset = rng.randrange(volume.size)
                data = rng.randbytes(min(rng.randrange(1, 200_000), volume.size - offset))
                await volume.write(offset, data)
                model[offset : offset + len(data)] = data
            if spec.tolerance == 0:
                assert await volume.read(0, volume.size) == model
                continue
            for device in rng.sample(devices, spec.tolerance):
                for _ in range(rng.randrange(1, 300)):
                    where = rng.randrange(MiB, len(device.data) - 4096)
                    device.data[where] ^= 1 << rng.randrange(8)
                    flipped += 1
            assert await volume.read(0, volume.size) == model
            for slab in sorted(volume.record.slabs):
                assert (await scrub_slab(volume, slab)).unrecoverable == []
            for slab in sorted(volume.record.slabs):
                report = await scrub_slab(volume, slab)
                assert report.checksum_errors == report.mismatches == report.repaired_blocks == 0
        assert spec.tolerance == 0 or flipped > 0

    trio.run(campaign)
