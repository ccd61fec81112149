"""`pool status` of a mounted pool that lost a disk says why automatic repair cannot run (a
2-disk mirror has nowhere to put the new copy), then, once a disk is added, that a repair
can be started, and after it nothing about repair at all."""

from __future__ import annotations

import os
import random

import pytest

from integration.helpers import BlockspaceEnv, InProcessCLI, MiB, missing_prerequisites

MISSING = missing_prerequisites()
pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(MISSING is not None, reason=MISSING or ""),
]


def test_status_lines_follow_a_lost_disk_through_its_repair(
    blockspace_env: BlockspaceEnv, capsys: pytest.CaptureFixture[str]
) -> None:
    env = blockspace_env
    bs = InProcessCLI(env, capsys)
    images = env.make_images([256 * MiB] * 3)
    bs.json("pool", "create", "tank", str(images[0]), str(images[1]), "--slab-size", "32M")
    bs.json("volume", "create", "tank", "vol0", "--size", "64M", "--resiliency", "mirror")
    mountpoint, pid = bs.mount("--allow-fault-injection")
    try:
        data = random.Random(3).randbytes(4 * MiB)
        fd = os.open(mountpoint / "vol0", os.O_RDWR)
        try:
            os.pwrite(fd, data, 0)
            os.fsync(fd)
            bs.json("fault", "inject", "tank", "1", "--dead")
            os.pwrite(fd, data, 8 * MiB)
            os.fsync(fd)
        finally:
            os.close(fd)
        status = bs.json("pool", "status", "tank")
        assert status["disks"][1]["state"] in ("failed", "missing"), status["disks"]
        assert ("automatic repair is not running: no spare capacity to rebuild onto (volume "
                "vol0 needs 2 disks, 1 in service)") in status["status"]
        assert any(a.startswith("add a disk (`blockspace disk add tank DISK`)")
                   for a in status["actions"])
        code, out, _ = bs("pool", "status", "tank")
        assert code == 0
        assert "status: disk 1 (" in out

        bs.json("disk", "add", "tank", str(images[2]))
        status = bs.json("pool", "status", "tank")
        if status.get("rebuild", {}).get("state") != "running":  # not started by itself
            assert "automatic repair is not running" in status["status"], status["status"]
        bs.json("pool", "repair", "tank", "--wait")
        status = bs.json("pool", "status", "tank")
        assert status["volumes"][0]["state"] == "online"
        assert "repair" not in status["status"], status["status"]
        assert "has failed" in status["status"] or "is missing" in status["status"]
    finally:
        bs.unmount(mountpoint, pid)
