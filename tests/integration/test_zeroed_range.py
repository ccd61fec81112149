"""A zeroed range under a live ext4 on a parity volume (issue 17, the first finding): a hole
punched into one image while unmounted (`fallocate --punch-hole`, as a thin store or a disk
returning zeros for what it lost would do) over the data and checksum areas of several of
its extents. Every block there reads as zeros with "never written" entries, which verify on
their own: the rows say otherwise, so the ext4 checks clean, every file reads back with its
hash, scrub repairs the rest from the columns that verify (nothing unrecoverable), and a
second scrub finds nothing.
"""

import subprocess

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
from .test_bitrot import AREA, scrub

MISSING = missing_prerequisites()
pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(MISSING is not None, reason=MISSING or ""),
]

STRIDE = 16 * MiB + 64 * 1024  # a 16 MiB extent and its checksum area


def test_zeroed_range_on_one_disk_of_a_parity_volume_is_served_and_repaired(
    blockspace_env: BlockspaceEnv,
) -> None:
    env = blockspace_env
    images = env.make_images([384 * MiB] * 3)
    env.cli_json("pool", "create", "rot", *map(str, images), "--slab-size", "16M",
                 "--metadata-size", "1M")
    env.create_volume("rot", "vol", "320M", "parity", "--parity", "1")
    mountpoint, pid = env.mount_pool("rot")
    loop = env.attach_loop(mountpoint / "vol")
    env.mkfs("ext4", loop)
    fs = env.mount_fs(loop, "fs", "ext4")
    hashes = write_random_files(fs, STANDARD_FILES, seed=17)
    env.umount_fs(fs)
    env.detach_loop(loop)
    env.unmount_pool(mountpoint, pid)

    # Unmounted: the first six extents of disk 0, data and checksums, become a hole.
    subprocess.run(["fallocate", "--punch-hole", "--offset", str(AREA), "--length",
                    str(6 * STRIDE), str(images[0])], check=True)

    mountpoint, pid = env.mount_pool("rot")
    loop = env.attach_loop(mountpoint / "vol")
    drop_caches()
    fsck = check_filesystem("ext4", loop)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    fs = env.mount_fs(loop, "fs", "ext4")
    drop_caches()
    assert hash_tree(fs) == hashes
    first = scrub(env)
    assert first["unrecoverable"] == []
    assert first["repaired_blocks"] > 0
    again = scrub(env)
    assert (again["checksum_errors"], again["mismatches"], again["repaired_blocks"],
            again["unrecoverable"]) == (0, 0, 0, [])
    status = env.status("rot")
    assert sum(d["errors"]["checksum"] for d in status["disks"]) > 0
    drop_caches()
    assert hash_tree(fs) == hashes
    env.umount_fs(fs)
    assert check_filesystem("ext4", loop).returncode == 0
    env.detach_loop(loop)
    env.unmount_pool(mountpoint, pid)
