"""One writer per pool, whatever path reaches its disks (issue 16 item 6 and its finding "A
second daemon can open the same disks through another path").

Before: with the pool mounted from its image files, the same images attached with losetup,
imported under another state directory and mounted again were accepted; both daemons
allocated the same extents and acknowledged writes were lost. The per-file flock does not
see a loop device; the host lock by disk UUID and the on-disk lease do.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

from blockspace.ondisk.label import LABEL_SIZE, LEASE_SIZE, decode_label
from blockspace.ondisk.lease import Holder, Lease, decode_lease, encode_lease
from blockspace.pool.lease import TAKEOVER_TIMEOUT

from .helpers import BlockspaceEnv, MiB, is_mounted, mounts, wait_exited

DISK = 96 * MiB
OTHER_HOST = Holder("bbbb2222", "beta", "1c8e5d4c-3a2f-4e1d-9c8b-7a6f5e4d3c2b", 77, 5)


def plant_lease(images: list[Path], status: dict[str, Any], counter: int) -> None:
    """What a writer on host beta leaves on every disk (its lease asks for a short watch)."""
    for image, disk in zip(images, status["disks"], strict=True):
        with open(image, "r+b") as handle:
            label = decode_label(handle.read(LABEL_SIZE))
            assert label is not None
            lease = Lease(status["uuid"], disk["uuid"], OTHER_HOST, counter, 1.0, "held", 1.0)
            handle.seek(label.geometry.lease_offset)
            handle.write(encode_lease(lease))


def one_line_error(result: subprocess.CompletedProcess[str], *expected: str) -> str:
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


def test_a_second_daemon_through_loop_devices_is_refused_until_the_first_is_dead(
    blockspace_env: BlockspaceEnv,
) -> None:
    env = blockspace_env
    images = env.make_images([DISK] * 3)
    env.create_pool("tank", images, slab_size="16M")
    env.create_volume("tank", "v", "32M", "mirror")
    _, first_pid = env.mount_pool("tank")

    loops = [env.attach_loop(image, pool_disk=True) for image in images]
    other = env.root / "other-state"
    second_mount = env.root / "second"
    second_mount.mkdir()
    second_pid: int | None = None
    try:
        # Reading is allowed: import (it only opens the pool once) and offline status,
        # which shows who writes the pool.
        env.cli_json("pool", "import", *loops, state_dir=other)
        status = env.cli_json("pool", "status", "tank", state_dir=other)
        assert status["lease"]["state"] == "held"
        assert status["lease"]["pid"] == first_pid
        assert status["lease"]["running"] is True
        human = env.cli("pool", "status", "tank", state_dir=other).stdout
        assert "writer lease: held by host " in human
        assert f"pid {first_pid} (running)" in human

        # Writing is refused, naming the holder and the path it holds the disk by.
        env.fuse_mounts.append(second_mount)
        result = env.cli("mount", "tank", str(second_mount), check=False, state_dir=other)
        line = one_line_error(result, "in use by another writer on this host",
                              f"pid {first_pid}", f"through {images[0]}")
        assert line.startswith("blockspace: error: mount failed: pool 'tank' disk 0")
        assert not is_mounted(second_mount)
        result = env.cli("volume", "create", "tank", "w", "--size", "16M", "--resiliency",
                         "mirror", check=False, state_dir=other)
        one_line_error(result, "pool 'tank' disk 0", f"pid {first_pid}",
                       f"through {images[0]}")
        result = env.cli("scrub", "tank", check=False, state_dir=other)
        one_line_error(result, "in use by another writer", f"pid {first_pid}")
        # Nor may `pool create --force` relabel a member a writer holds.
        result = env.cli("pool", "create", "new", loops[1], "--force", check=False,
                         state_dir=other)
        line = one_line_error(result, f"{loops[1]} (pool 'tank' disk 1)", f"pid {first_pid}",
                              f"through {images[1]}")
        assert "in use by another writer on this host" in line
        volumes = [v["name"] for v in env.status("tank")["volumes"]]
        assert volumes == ["v"]  # nothing was created behind the daemon's back

        # The first daemon dies without a word: its lease names a dead pid of this host,
        # taken at once.
        env.kill_daemon(first_pid)
        env.fusermount_lazy(env.root / "pool-tank")
        info = env.cli_json("mount", "tank", str(second_mount), state_dir=other)
        second_pid = int(info["pid"])
        env.daemons.append(second_pid)
        assert mounts().get(str(second_mount)) == "fuse.blockspace"
        status = env.cli_json("pool", "status", "tank", state_dir=other)
        assert status["lease"]["state"] == "held"
        assert status["lease"]["pid"] == second_pid
        assert [v["name"] for v in status["volumes"]] == ["v"]
    finally:
        if second_pid is not None and is_mounted(second_mount):
            env.cli("unmount", str(second_mount), state_dir=other)
            assert wait_exited(second_pid, 30)
            env.fuse_mounts.remove(second_mount)
        for loop in loops:
            env.detach_loop(loop)
    # Released at the clean stop: the images open again from the first registry.
    status = env.status("tank")
    assert status["lease"]["state"] == "released"


def test_offline_status_of_a_released_pool(blockspace_env: BlockspaceEnv) -> None:
    env = blockspace_env
    images = env.make_images([DISK] * 2)
    env.create_pool("tank", images, slab_size="16M")
    assert env.status("tank")["lease"]["state"] == "none"  # nothing has written it yet
    mountpoint, pid = env.mount_pool("tank")
    env.unmount_pool(mountpoint, pid)
    status = env.status("tank")
    assert status["lease"]["state"] == "released"
    assert "writer lease: released" in env.cli("pool", "status", "tank").stdout


def test_a_daemon_whose_lease_is_taken_over_stops_at_once(blockspace_env: BlockspaceEnv) -> None:
    """`mount --force` on another host took the pool: the daemon here sees a lease that is
    not its own at its next beat and exits without writing another byte (status 75)."""
    env = blockspace_env
    images = env.make_images([DISK] * 2)
    env.create_pool("tank", images, slab_size="16M")
    mountpoint, pid = env.mount_pool("tank")
    status = env.status("tank")
    plant_lease(images, status, 10**6)
    assert wait_exited(pid, 30), "the daemon kept running on a pool taken over"
    log = env.daemon_log("tank")
    assert "taken over by host beta" in log
    assert "stopping at once, without a final flush" in log
    env.fusermount_lazy(mountpoint)
    for image in images:  # nothing of ours went over the new holder's lease
        with open(image, "rb") as handle:
            label = decode_label(handle.read(LABEL_SIZE))
            assert label is not None
            handle.seek(label.geometry.lease_offset)
            lease = decode_lease(handle.read(LEASE_SIZE), status["uuid"], label.disk_uuid)
            assert lease is not None
            assert lease.holder == OTHER_HOST


def test_mount_waits_for_another_hosts_lease_or_takes_it_with_force(
    blockspace_env: BlockspaceEnv,
) -> None:
    """A pool last written by host beta (its daemon gone with the host): `mount` says it is
    watching the lease, then takes it since it did not move; `mount --force` takes it at
    once. Offline status shows beta as the holder meanwhile."""
    env = blockspace_env
    images = env.make_images([DISK] * 2)
    env.create_pool("tank", images, slab_size="16M")
    status = env.status("tank")
    plant_lease(images, status, 5)
    shown = env.status("tank")["lease"]
    assert shown["state"] == "held"
    assert (shown["host"], shown["pid"], shown["running"]) == ("beta", 77, False)

    mountpoint = env.root / "pool-tank"
    mountpoint.mkdir()
    env.fuse_mounts.append(mountpoint)
    start = time.monotonic()
    result = env.cli("--json", "mount", "tank", str(mountpoint), "--force")
    assert time.monotonic() - start < TAKEOVER_TIMEOUT  # no watch
    assert "waiting" not in result.stderr
    pid = int(json.loads(result.stdout)["pid"])
    env.daemons.append(pid)
    assert env.status("tank")["lease"]["pid"] == pid
    env.unmount_pool(mountpoint, pid)

    plant_lease(images, status, 6)
    env.fuse_mounts.append(mountpoint)
    start = time.monotonic()
    result = env.cli("--json", "mount", "tank", str(mountpoint))
    assert time.monotonic() - start >= TAKEOVER_TIMEOUT
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("blockspace: pool 'tank': disk 0: its lease is held by host beta")
    assert f"waiting {TAKEOVER_TIMEOUT:g}s to see whether it is still beating" in lines[0]
    pid = int(json.loads(result.stdout)["pid"])
    env.daemons.append(pid)
    assert env.status("tank")["lease"]["pid"] == pid
    env.unmount_pool(mountpoint, pid)
