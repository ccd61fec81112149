"""`blockspace fault ...` end to end on a real mount: the fault CLI against a live daemon, and
a dead disk brought back online and resynced."""

from __future__ import annotations

import os
import random

import pytest

from .helpers import BlockspaceEnv, InProcessCLI, MiB, missing_prerequisites

MISSING = missing_prerequisites()


@pytest.mark.integration
@pytest.mark.skipif(MISSING is not None, reason=MISSING or "")
def test_fault_cli_on_a_real_mount(
    blockspace_env: BlockspaceEnv, capsys: pytest.CaptureFixture[str]
) -> None:
    env = blockspace_env
    bs = InProcessCLI(env, capsys)
    images = env.make_images([256 * MiB, 256 * MiB])
    bs.json("pool", "create", "tank", *map(str, images), "--slab-size", "32M")
    bs.json("volume", "create", "tank", "vol0", "--size", "64M", "--resiliency", "mirror",
            "--copies", "2")
    first = random.Random(1).randbytes(4 * MiB)
    second = random.Random(2).randbytes(4 * MiB)

    mountpoint, pid = bs.mount("--allow-fault-injection")
    try:
        volume_file = mountpoint / "vol0"
        fd = os.open(volume_file, os.O_RDWR)
        try:
            assert os.pwrite(fd, first, 0) == len(first)
            os.fsync(fd)
            report = bs.json("fault", "inject", "tank", str(images[1]), "--dead")
            assert report["id"] == 1
            assert report["spec"]["dead"] is True

            assert os.pwrite(fd, second, 8 * MiB) == len(second)
            os.fsync(fd)
            assert os.pread(fd, len(first), 0) == first
            assert os.pread(fd, len(second), 8 * MiB) == second
        finally:
            os.close(fd)

        status = bs.json("pool", "status", "tank")
        assert status["disks"][0]["state"] == "online"
        assert status["disks"][1]["state"] != "online"
        assert status["volumes"][0]["state"] == "degraded"

        code, _, err = bs("fault", "inject", "tank", "1", "--write-error", "lots")
        assert code == 2
        assert err.strip() == ("blockspace: error: --write-error takes a percentage like 1% "
                               "or 0.5%, not 'lots'")

        cleared = bs.json("fault", "clear", "tank")
        assert cleared["cleared"] == [1]
        dead = cleared["disks"][1]
        assert dead["spec"] is None
        assert dead["state"] == status["disks"][1]["state"]
        assert dead["statistics"]["errors"] >= 1  # the layer did fail its I/O
        assert cleared["disks"][0]["statistics"]["errors"] == 0
        with open(volume_file, "rb") as handle:
            assert handle.read(len(first)) == first
    finally:
        bs.unmount(mountpoint, pid)

    # Without the flag at mount, nothing can be injected: and through the real command line.
    mountpoint, pid = bs.mount()
    try:
        refused = env.cli("fault", "inject", "tank", "0", "--dead", check=False)
        assert refused.returncode != 0
        assert refused.stderr.strip() == (
            "blockspace: error: fault injection is disabled on this mount "
            "(mount with --allow-fault-injection)"
        )
        with open(mountpoint / "vol0", "rb") as handle:
            handle.seek(8 * MiB)
            assert handle.read(len(second)) == second
    finally:
        bs.unmount(mountpoint, pid)


@pytest.mark.integration
@pytest.mark.skipif(MISSING is not None, reason=MISSING or "")
def test_a_dead_disk_brought_back_online_is_resynced_on_a_real_mount(
    blockspace_env: BlockspaceEnv, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two disks, mirror: one dies, writes go on (into new slabs too, placed degraded),
    the fault is cleared, `disk online --wait` resyncs what it missed; then the other disk
    dies and every byte still reads back, from the returned disk. A disk added while
    mounted takes injected faults as well."""
    env = blockspace_env
    bs = InProcessCLI(env, capsys)
    images = env.make_images([128 * MiB, 128 * MiB, 128 * MiB])
    bs.json("pool", "create", "tank", str(images[0]), str(images[1]), "--slab-size", "16M")
    bs.json("volume", "create", "tank", "vol0", "--size", "96M", "--resiliency", "mirror")
    before = random.Random(3).randbytes(8 * MiB)
    during = random.Random(4).randbytes(8 * MiB)
    mountpoint, pid = bs.mount("--allow-fault-injection")
    try:
        fd = os.open(mountpoint / "vol0", os.O_RDWR)
        try:
            os.pwrite(fd, before, 0)
            os.fsync(fd)
            bs.json("fault", "inject", "tank", "1", "--dead")
            os.pwrite(fd, during, 4 * MiB)  # half into slab 0, half into unallocated space
            os.pwrite(fd, during, 64 * MiB)  # a new slab while a disk is dead
            os.fsync(fd)
            assert bs.json("pool", "status", "tank")["disks"][1]["state"] == "failed"
            code, _, err = bs("disk", "online", "tank", "1")
            assert code == 1, err  # the fault is still there: reading its label fails
            assert "disk 1" in err
            bs.json("fault", "clear", "tank")
            result = bs.json("disk", "online", "tank", "1", "--wait")
            assert (result["state"], result["reason"]) == ("done", "resync disk 1")
            status = bs.json("pool", "status", "tank")
            assert [d["state"] for d in status["disks"]] == ["online", "online"]
            assert status["volumes"][0]["state"] == "online"
            # The returned disk alone now holds everything.
            bs.json("fault", "inject", "tank", "0", "--dead")
            expected = before[: 4 * MiB] + during
            assert os.pread(fd, len(expected), 0) == expected
            assert os.pread(fd, len(during), 64 * MiB) == during
            bs.json("fault", "clear", "tank")
            if bs.json("pool", "status", "tank")["disks"][0]["state"] == "failed":
                # (the reads failed on it and their repairs could not be written)
                assert bs.json("disk", "online", "tank", "0", "--wait")["state"] == "done"
            # A disk joining while mounted sits behind the fault layer too.
            bs.json("disk", "add", "tank", str(images[2]))
            report = bs.json("fault", "inject", "tank", str(images[2]), "--read-error", "100%")
            assert report["id"] == 2
            bs.json("fault", "clear", "tank")
        finally:
            os.close(fd)
    finally:
        bs.unmount(mountpoint, pid)
    status = bs.json("pool", "status", "tank")
    assert {d["state"] for d in status["disks"]} == {"online"}
