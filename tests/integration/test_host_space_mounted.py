"""A full host file system under a mounted pool's images (issue 17 item 3), for real: sparse
images on a small tmpfs, a mirror volume written through FUSE until the tmpfs is full. The
write that needed room fails with ENOSPC, no disk is failed, acknowledged data reads back,
`pool status` says what to do, and once the tmpfs is made larger writes succeed again
without `disk online`, and a scrub finds every copy consistent."""

from __future__ import annotations

import errno
import os
import subprocess
import tempfile
from pathlib import Path

import pytest

from .helpers import BlockspaceEnv, InProcessCLI, MiB, drop_caches, missing_prerequisites

MISSING = missing_prerequisites()
CHUNK = MiB


def chunk(index: int) -> bytes:
    return bytes([index % 250 + 1]) * (CHUNK - 16) + index.to_bytes(16, "little")


@pytest.mark.integration
@pytest.mark.skipif(MISSING is not None, reason=MISSING or "")
def test_a_full_host_tmpfs_is_not_a_dead_disk(
    blockspace_env: BlockspaceEnv, capsys: pytest.CaptureFixture[str]
) -> None:
    env = blockspace_env
    bs = InProcessCLI(env, capsys)
    host = Path(tempfile.mkdtemp(prefix="hostspace-", dir="/tmp"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(host)], check=True)
    try:
        images = []
        for index in range(3):
            path = host / f"disk{index}.img"
            with open(path, "xb") as handle:
                handle.truncate(256 * MiB)
            images.append(path)
        bs.json("pool", "create", "tank", *map(str, images), "--slab-size", "4M")
        bs.json("volume", "create", "tank", "vol0", "--size", "128M", "--resiliency",
                "mirror", "--copies", "2")
        mountpoint, pid = bs.mount()
        volume_file = mountpoint / "vol0"
        acknowledged = 0
        fd = os.open(volume_file, os.O_RDWR)
        try:
            refused: OSError | None = None
            for index in range(128):  # 40 MiB of tmpfs: about 19 chunks
                try:
                    os.pwrite(fd, chunk(index), index * CHUNK)
                    os.fsync(fd)
                except OSError as error:
                    refused = error
                    break
                acknowledged = index + 1
            assert refused is not None
            assert refused.errno == errno.ENOSPC, refused
            assert acknowledged > 4

            status = bs.json("pool", "status", "tank")
            assert [d["state"] for d in status["disks"]] == ["online"] * 3
            assert status["health"] == "online"
            assert [d["errors"]["write"] for d in status["disks"]] == [0, 0, 0]
            assert status["actions"], status
            assert all("is full: free space there" in action for action in status["actions"])
            code, text, _ = bs("pool", "status", "tank")
            assert code == 0
            assert f"action: host file system under {host}/disk" in text

            drop_caches()
            for index in range(acknowledged):
                assert os.pread(fd, CHUNK, index * CHUNK) == chunk(index), index
            # An overwrite of blocks that already have room on the host still works.
            os.pwrite(fd, chunk(500), 0)
            os.fsync(fd)

            subprocess.run(["mount", "-o", "remount,size=512m", str(host)], check=True)
            for index in range(acknowledged, acknowledged + 4):
                os.pwrite(fd, chunk(index), index * CHUNK)
                os.fsync(fd)
            drop_caches()
            assert os.pread(fd, CHUNK, 0) == chunk(500)
            for index in range(1, acknowledged + 4):
                assert os.pread(fd, CHUNK, index * CHUNK) == chunk(index), index
        finally:
            os.close(fd)

        status = bs.json("pool", "status", "tank")
        assert [d["state"] for d in status["disks"]] == ["online"] * 3
        assert status["actions"] == []
        report = bs.json("scrub", "tank", "--wait")
        found = report.get("report", report)
        assert found["checksum_errors"] == 0, report
        assert found["unrecoverable"] == [], report
        bs.unmount(mountpoint, pid)
    finally:
        problems = env.cleanup()  # the daemon lets go of the images before the tmpfs goes
        subprocess.run(["umount", "-l", str(host)], check=False)
        os.rmdir(host)
    assert not problems, problems
