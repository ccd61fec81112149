"""Bitrot, for real: bytes flipped in the backing image files (unmounted and mounted, in data
and metadata areas) under an ext4 on a Blockspace volume. Within tolerance every file reads
back with its hash, scrub repairs what the reads did not touch, and a second scrub finds
nothing. Beyond tolerance, the hit blocks fail with EIO, the rest stays readable, and scrub
lists the unrecoverable ranges.
"""

import errno
import json
import random
from pathlib import Path

import pytest

from .helpers import (
    STANDARD_FILES,
    BlockspaceEnv,
    MiB,
    check_filesystem,
    drop_caches,
    hash_tree,
    missing_prerequisites,
    write_random_files,
)

MISSING = missing_prerequisites()
pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(MISSING is not None, reason=MISSING or ""),
]

META_START = 4096  # right after the primary label


def flip_bytes(image: Path, rng: random.Random, count: int, lo: int, hi: int) -> list[int]:
    """Flip one bit in each of `count` random bytes of image[lo:hi]; returns the offsets."""
    offsets = sorted(rng.randrange(lo, hi) for _ in range(count))
    with open(image, "r+b") as handle:
        for offset in offsets:
            handle.seek(offset)
            byte = handle.read(1)[0]
            handle.seek(offset)
            handle.write(bytes([byte ^ (1 << rng.randrange(8))]))
    return offsets


def build(env: BlockspaceEnv, resiliency: tuple[str, ...], disks: int) -> tuple[
    list[Path], dict[str, str]
]:
    images = env.make_images([384 * MiB] * disks)
    env.cli_json("pool", "create", "rot", *map(str, images), "--slab-size", "16M",
                 "--metadata-size", "1M")
    env.create_volume("rot", "vol", "320M", resiliency[0], *resiliency[1:])
    mountpoint, pid = env.mount_pool("rot")
    loop = env.attach_loop(mountpoint / "vol")
    env.mkfs("ext4", loop)
    fs = env.mount_fs(loop, "fs", "ext4")
    hashes = write_random_files(fs, STANDARD_FILES, seed=11)
    env.umount_fs(fs)
    env.detach_loop(loop)
    env.unmount_pool(mountpoint, pid)
    return images, hashes


def scrub(env: BlockspaceEnv) -> dict[str, int]:
    result = env.cli("--json", "scrub", "rot", "--wait", check=False)
    report = json.loads(result.stdout)
    assert report["state"] == "done", report
    return report["report"]


# The data area starts after the label, two 1 MiB metadata slots and two 64 KiB intent
# slots, rounded up to 1 MiB: 3 MiB here.
AREA = 3 * MiB


@pytest.mark.parametrize(
    ("resiliency", "disks"),
    [(("mirror", "--copies", "2"), 3), (("parity", "--parity", "1"), 4)],
    ids=["mirror-2", "parity-1"],
)
def test_bitrot_within_tolerance_is_healed_and_scrub_repairs_the_rest(
    blockspace_env: BlockspaceEnv, resiliency: tuple[str, ...], disks: int
) -> None:
    env = blockspace_env
    images, hashes = build(env, resiliency, disks)
    rng = random.Random(5)
    # Unmounted: rot in the data area and in the metadata slots of one disk.
    flip_bytes(images[0], rng, 4000, AREA, 200 * MiB)
    flip_bytes(images[0], rng, 20, META_START, 2 * MiB)
    mountpoint, pid = env.mount_pool("rot")
    loop = env.attach_loop(mountpoint / "vol")
    fs = env.mount_fs(loop, "fs", "ext4")
    drop_caches()
    assert hash_tree(fs) == hashes
    first = scrub(env)
    assert first["checksum_errors"] > 0
    assert first["repaired_blocks"] > 0
    assert first["unrecoverable"] == []
    # Mounted: rot on another disk, behind the daemon's back.
    flip_bytes(images[1], rng, 4000, AREA, 200 * MiB)
    drop_caches()
    assert hash_tree(fs) == hashes
    second = scrub(env)
    assert second["checksum_errors"] > 0
    assert second["unrecoverable"] == []
    third = scrub(env)
    assert third["checksum_errors"] == 0
    assert third["mismatches"] == 0
    assert third["repaired_blocks"] == 0
    status = env.status("rot")
    assert sum(d["errors"]["checksum"] for d in status["disks"]) > 0
    assert status["scrub"]["state"] == "done"
    env.umount_fs(fs)
    assert check_filesystem("ext4", loop).returncode == 0
    env.detach_loop(loop)
    env.unmount_pool(mountpoint, pid)


def test_bitrot_beyond_tolerance_fails_those_blocks_only(blockspace_env: BlockspaceEnv) -> None:
    env = blockspace_env
    # Two equal disks in a 2-way mirror: slab i sits in extent i of both, at the same
    # offsets, so flipping the same bytes on both rots both copies of the same blocks.
    images = env.make_images([384 * MiB] * 2)
    env.cli_json("pool", "create", "rot", *map(str, images), "--slab-size", "16M",
                 "--metadata-size", "1M")
    env.create_volume("rot", "vol", "256M", "mirror", "--copies", "2")
    mountpoint, pid = env.mount_pool("rot")
    volume_file = mountpoint / "vol"
    payload = random.Random(2).randbytes(64 * MiB)
    with open(volume_file, "r+b") as handle:
        handle.write(payload)
    env.unmount_pool(mountpoint, pid)
    hit = AREA + 40 * MiB + 12345  # inside the data of extent 2 on both disks
    for image in images:
        with open(image, "r+b") as handle:
            handle.seek(hit)
            byte = handle.read(1)[0]
            handle.seek(hit)
            handle.write(bytes([byte ^ 0xFF]))
    mountpoint, pid = env.mount_pool("rot")
    with open(volume_file, "rb", buffering=0) as handle:
        assert handle.read(1 * MiB) == payload[: 1 * MiB]  # elsewhere: fine
        extent_stride = 16 * MiB + 64 * 1024  # slab + its checksum area
        volume_offset = hit - AREA - 2 * extent_stride + 2 * 16 * MiB
        handle.seek(volume_offset - volume_offset % 4096)
        with pytest.raises(OSError) as raised:
            handle.read(4096)
        assert raised.value.errno == errno.EIO
    report = scrub(env)
    assert [(u["volume"], u["offset"], u["length"]) for u in report["unrecoverable"]] == [
        ("vol", volume_offset - volume_offset % 4096, 4096)
    ]
    env.unmount_pool(mountpoint, pid)
