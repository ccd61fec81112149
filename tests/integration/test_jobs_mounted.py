"""Disk jobs on a real mount (issue 17 item 6): a `kill -9` of the daemon in the middle of
`disk retire --wait` or `disk replace --wait`, and the next mount finishes the job with no
command (re-running the replace joins it instead of failing "in use by another process");
`disk rebuild --cancel` and `--rate` on a running job; another disk command refused while one
runs, with its exit code."""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from .helpers import BlockspaceEnv, InProcessCLI, MiB, missing_prerequisites, wait_until

MISSING = missing_prerequisites()
DATA = 20 * MiB  # 20 one-MiB slabs of a 2-way mirror: about 10 extents per disk of 4


def fill(mountpoint: Path) -> str:
    """Random data over the volume's first DATA bytes, fsynced; its sha256."""
    data = random.Random(11).randbytes(DATA)
    fd = os.open(mountpoint / "v", os.O_RDWR)
    try:
        assert os.pwrite(fd, data, 0) == DATA
        os.fsync(fd)
    finally:
        os.close(fd)
    return hashlib.sha256(data).hexdigest()


def digest(mountpoint: Path) -> str:
    fd = os.open(mountpoint / "v", os.O_RDONLY | os.O_DIRECT)
    try:
        return hashlib.sha256(os.pread(fd, DATA, 0)).hexdigest()
    finally:
        os.close(fd)


def setup(env: BlockspaceEnv, bs: InProcessCLI, disks: int = 4) -> tuple[Path, int, str]:
    images = env.make_images([64 * MiB] * disks)
    bs.json("pool", "create", "tank", *map(str, images), "--slab-size", "1M")
    bs.json("volume", "create", "tank", "v", "--size", "32M", "--resiliency", "mirror")
    mountpoint, pid = bs.mount()
    return mountpoint, pid, fill(mountpoint)


def busiest(status: dict[str, Any]) -> int:
    return int(max(status["disks"], key=lambda d: d["data_extents"])["id"])


def background(env: BlockspaceEnv, *args: str) -> subprocess.Popen[str]:
    """A CLI command left running (a `--wait` the test kills the daemon under)."""
    command = [sys.executable, "-m", "blockspace", "--state-dir", str(env.state_dir), *args]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            stdin=subprocess.DEVNULL, text=True,
                            env=dict(os.environ, BLOCKSPACE_STATE_DIR=str(env.state_dir)))


def rebuild(bs: InProcessCLI) -> dict[str, Any]:
    return dict(bs.json("pool", "status", "tank")["rebuild"])


def kill_during(env: BlockspaceEnv, bs: InProcessCLI, pid: int, *command: str) -> None:
    """Run `command` (with --wait) in the background, kill -9 the daemon once two extents
    have moved, and detach the dead mount."""
    waiter = background(env, *command)
    try:
        assert wait_until(lambda: rebuild(bs)["done"] >= 2, 60), rebuild(bs)
        assert rebuild(bs)["state"] == "running"
        env.kill_daemon(pid)
        waiter.wait(30)
    finally:
        if waiter.poll() is None:
            waiter.kill()
            waiter.wait(10)
    assert waiter.returncode != 0  # it lost its daemon: not a success
    env.fusermount_lazy(env.root / "pool-tank")


@pytest.mark.integration
@pytest.mark.skipif(MISSING is not None, reason=MISSING or "")
def test_retire_killed_mid_job_finishes_at_the_next_mount(
    blockspace_env: BlockspaceEnv, capsys: pytest.CaptureFixture[str]
) -> None:
    env = blockspace_env
    bs = InProcessCLI(env, capsys)
    mountpoint, pid, expected = setup(env, bs)
    disk = busiest(bs.json("pool", "status", "tank"))
    kill_during(env, bs, pid, "disk", "retire", "tank", str(disk), "--rate", "1M", "--wait")
    status = bs.json("pool", "status", "tank")  # offline: still retiring, data left on it
    assert status["disks"][disk]["state"] == "retiring"
    assert status["disks"][disk]["data_extents"] > 0
    code, out, _ = bs("disk", "rebuild", "tank")  # what the next mount will resume
    assert code == 0
    assert "resumes at the next mount" in out

    mountpoint, pid = bs.mount()
    assert rebuild(bs)["reason"] == f"retire disk {disk}"  # resumed, no command given
    assert wait_until(lambda: rebuild(bs)["state"] != "running", 90), rebuild(bs)
    status = bs.json("pool", "status", "tank")
    assert status["rebuild"]["state"] == "done", status["rebuild"]
    assert status["disks"][disk]["state"] == "retired"
    assert status["disks"][disk]["data_extents"] == 0
    assert status["volumes"][0]["state"] == "online"
    assert digest(mountpoint) == expected
    # Removable now; its labels go and the daemon lets go of the file: it can come back.
    bs.json("disk", "remove", "tank", str(disk), "--wait")
    image = env.images_dir / f"disk{disk}.img"
    bs.json("disk", "add", "tank", str(image))
    assert digest(mountpoint) == expected
    env.unmount_pool(mountpoint, pid)


@pytest.mark.integration
@pytest.mark.skipif(MISSING is not None, reason=MISSING or "")
def test_replace_killed_mid_job_resumes_and_asking_again_joins_it(
    blockspace_env: BlockspaceEnv, capsys: pytest.CaptureFixture[str]
) -> None:
    env = blockspace_env
    bs = InProcessCLI(env, capsys)
    mountpoint, pid, expected = setup(env, bs)
    disk = busiest(bs.json("pool", "status", "tank"))
    spare = env.images_dir / "spare.img"
    with open(spare, "xb") as handle:
        handle.truncate(64 * MiB)
    kill_during(env, bs, pid, "disk", "replace", "tank", str(disk), str(spare), "--rate", "1M",
                "--wait")

    mountpoint, pid = bs.mount()
    assert rebuild(bs)["state"] == "running"
    # The command again, as a user would after the crash: it joins the resumed job (it
    # used to fail: the new disk is a member, open and locked by the daemon).
    code, out, err = bs("disk", "replace", "tank", str(disk), str(spare))
    assert code == 0, err
    assert f"replace disk {disk} by disk 4" in out
    bs.json("disk", "rebuild", "tank", "--rate", "0")  # no need to wait at 1M/s now
    done = bs.json("disk", "rebuild", "tank", "--wait")
    assert done["state"] == "done", done
    status = bs.json("pool", "status", "tank")
    assert disk not in [d["id"] for d in status["disks"]]
    assert status["health"] == "online"
    assert digest(mountpoint) == expected
    env.unmount_pool(mountpoint, pid)


@pytest.mark.integration
@pytest.mark.skipif(MISSING is not None, reason=MISSING or "")
def test_cancel_rate_change_and_refusal_while_a_job_runs(
    blockspace_env: BlockspaceEnv, capsys: pytest.CaptureFixture[str]
) -> None:
    env = blockspace_env
    bs = InProcessCLI(env, capsys)
    mountpoint, pid, expected = setup(env, bs)
    disk = busiest(bs.json("pool", "status", "tank"))
    other = (disk + 1) % 4
    code, _, err = bs("disk", "retire", "tank", str(disk), "--rate", "1")
    assert code == 2
    assert "at least 1M" in err
    assert err.count("\n") == 1
    bs.json("disk", "retire", "tank", str(disk), "--rate", "1M")
    # Another disk operation is refused, with what to do about it.
    code, _, err = bs("disk", "retire", "tank", str(other))
    assert code == 1
    assert f"a rebuild is running (retire disk {disk}" in err
    assert "disk rebuild tank --cancel" in err
    assert err.count("\n") == 1
    # The rate of the running job changes (and a bad one is refused).
    assert bs.json("disk", "rebuild", "tank", "--rate", "2M")["rate_limit"] == 2 * MiB
    assert rebuild(bs)["rate_limit"] == 2 * MiB
    code, _, err = bs("disk", "rebuild", "tank", "--rate", "5K")
    assert code == 2
    assert "at least 1M" in err
    assert wait_until(lambda: rebuild(bs)["done"] >= 1, 60)
    started = time.monotonic()
    cancelled = bs.json("disk", "rebuild", "tank", "--cancel")
    assert time.monotonic() - started < 20
    assert cancelled["state"] == "cancelled"
    status = bs.json("pool", "status", "tank")
    left = status["disks"][disk]["data_extents"]
    assert left > 0
    assert status["disks"][disk]["state"] == "retiring"
    assert f"cancelled with {left} extents left" in status["disks"][disk]["state_reason"]
    assert digest(mountpoint) == expected
    code, _, err = bs("disk", "rebuild", "tank", "--cancel")
    assert code == 5
    assert "no rebuild to cancel" in err
    # Nothing is refused any more; the retire can be finished by asking again.
    bs.json("disk", "retire", "tank", str(disk), "--wait")
    assert bs.json("pool", "status", "tank")["disks"][disk]["state"] == "retired"
    assert digest(mountpoint) == expected
    env.unmount_pool(mountpoint, pid)
    # Cancelled: nothing to resume at the next mount.
    code, _, _ = bs("disk", "rebuild", "tank")
    assert code == 5
