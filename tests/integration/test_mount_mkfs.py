"""Real mounts: pool of image files (or loop devices) -> FUSE volume file -> losetup -> mkfs
-> files; then everything is taken down, the daemon restarted, and the file system must fsck
clean with every file's hash intact. Also: a missing disk, `kill -9` of the daemon under a
mounted ext4, and the permissions of the volume files and the control socket.
"""

import os
import signal
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from .helpers import (
    STANDARD_FILES,
    BlockspaceEnv,
    GiB,
    MiB,
    check_filesystem,
    drop_caches,
    hash_tree,
    have_tool,
    is_mounted,
    loop_backing_file,
    missing_prerequisites,
    mounts,
    process_alive,
    run,
    system_python,
    tool,
    wait_exited,
    wait_until,
    write_random_files,
)

MISSING = missing_prerequisites()
pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(MISSING is not None, reason=MISSING or ""),
]

# Uneven on purpose: the allocator must use them the way btrfs does.
FIVE_DISKS = [1 * GiB, 1 * GiB, 3 * GiB // 2, 2 * GiB, 2 * GiB]
FOUR_DISKS = [1 * GiB, 3 * GiB // 2, 2 * GiB, 2 * GiB]
SLAB = 32 * MiB
VOLUME_SIZE = "1G"


@dataclass(frozen=True)
class Case:
    resiliency: str
    options: tuple[str, ...]
    disks: tuple[int, ...]
    describe: str  # what `volume create --json` must report as "resiliency"
    provisioning: str = "thin"


CASES = {
    "simple": Case("simple", (), tuple(FIVE_DISKS), "simple (5 col)"),
    "mirror-2": Case("mirror", ("--copies", "2"), tuple(FIVE_DISKS), "mirror-2", "fixed"),
    "mirror-3": Case("mirror", ("--copies", "3"), tuple(FIVE_DISKS), "mirror-3"),
    "parity-1": Case("parity", ("--parity", "1"), tuple(FIVE_DISKS), "parity-1 (4+1)"),
    "parity-2": Case("parity", ("--parity", "2"), tuple(FOUR_DISKS), "parity-2 (2+2)"),
}


# ---- building blocks ----------------------------------------------------------------------


def make_pool(
    env: BlockspaceEnv, case: Case, *, disks: list[Path] | list[str] | None = None
) -> dict[str, Any]:
    """Pool "tank" with volume "vol0"; returns the volume's record."""
    if disks is None:
        disks = env.make_images(case.disks)
    status = env.create_pool("tank", disks, slab_size=f"{SLAB // MiB}M")
    assert status["health"] == "online"
    assert status["slab_size"] == SLAB
    assert [d["state"] for d in status["disks"]] == ["online"] * len(case.disks)
    assert [d["size"] for d in status["disks"]] == list(case.disks)
    volume = env.create_volume(
        "tank", "vol0", VOLUME_SIZE, case.resiliency, *case.options,
        "--provisioning", case.provisioning,
    )
    assert volume["name"] == "vol0"
    assert volume["size"] == GiB
    assert volume["resiliency"] == case.describe
    assert volume["provisioning"] == case.provisioning
    assert volume["state"] == "online"
    if case.provisioning == "fixed":
        assert volume["allocated"] >= GiB  # every slab placed up front
    else:
        assert volume["allocated"] == 0
    return volume


def attach_volume(env: BlockspaceEnv, mountpoint: Path) -> str:
    volume_file = mountpoint / "vol0"
    assert os.stat(volume_file).st_size == GiB
    loop = env.attach_loop(volume_file)
    size = int(run([tool("blockdev"), "--getsize64", loop]).stdout)
    assert size == GiB
    return loop


def populate(env: BlockspaceEnv, fstype: str, seed: int) -> tuple[Path, int, str, dict[str, str]]:
    """Mount the pool, put a fresh file system with random files on vol0, and leave it all
    mounted. Returns (pool mount point, daemon pid, loop device, hashes)."""
    mountpoint, pid = env.mount_pool("tank")
    loop = attach_volume(env, mountpoint)
    env.mkfs(fstype, loop)
    fs = env.mount_fs(loop, "fs", fstype)
    hashes = write_random_files(fs, STANDARD_FILES, seed)
    run(["sync"])
    assert hash_tree(fs) == hashes
    return mountpoint, pid, loop, hashes


def take_down(env: BlockspaceEnv, mountpoint: Path, pid: int, loop: str) -> None:
    """Unmount the file system, detach the loop device, unmount the pool (no --force: the
    volume must no longer count as open once the loop device is gone)."""
    env.umount_fs(env.root / "fs")
    env.detach_loop(loop)
    env.unmount_pool(mountpoint, pid)
    assert not (env.state_dir / "run" / "tank.json").exists()  # the mount record is gone


def verify(env: BlockspaceEnv, fstype: str, hashes: dict[str, str]) -> tuple[Path, int, str]:
    """Restart the daemon, fsck the file system read-only, then compare every file.
    Leaves everything mounted; returns (pool mount point, daemon pid, loop device)."""
    mountpoint, pid = env.mount_pool("tank")
    loop = attach_volume(env, mountpoint)
    check = check_filesystem(fstype, loop)
    assert check.returncode == 0, f"{fstype} check failed:\n{check.stdout}\n{check.stderr}"
    fs = env.mount_fs(loop, "fs", fstype)
    drop_caches()
    assert hash_tree(fs) == hashes
    return mountpoint, pid, loop


def roundtrip(
    env: BlockspaceEnv, fstype: str, seed: int, *, try_busy_unmount: bool = False
) -> None:
    mountpoint, pid, loop, hashes = populate(env, fstype, seed)
    if try_busy_unmount:
        # While the loop device holds the volume open, a plain unmount is refused, clearly.
        refused = env.cli("unmount", str(mountpoint), check=False)
        assert refused.returncode != 0
        assert "in use" in refused.stderr
        assert mounts().get(str(mountpoint)) == "fuse.blockspace"
    take_down(env, mountpoint, pid, loop)

    new_mountpoint, new_pid, new_loop = verify(env, fstype, hashes)
    assert new_pid != pid
    take_down(env, new_mountpoint, new_pid, new_loop)


# ---- the tests ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_ext4_survives_daemon_restart(blockspace_env: BlockspaceEnv, name: str) -> None:
    env = blockspace_env
    case = CASES[name]
    make_pool(env, case)
    roundtrip(env, "ext4", seed=list(CASES).index(name))

    status = env.status("tank")
    [volume] = status["volumes"]
    assert volume["state"] == "online"
    assert volume["allocated"] > 0
    if case.provisioning == "thin":
        assert volume["allocated"] < GiB  # thin: only what ext4 touched is placed
    assert status["health"] == "online"
    assert status["mountpoint"] is None
    assert all(not any(d["errors"].values()) for d in status["disks"]), status["disks"]


@pytest.mark.skipif(
    not (have_tool("mkfs.xfs") and have_tool("xfs_repair")), reason="xfsprogs is not installed"
)
def test_xfs_survives_daemon_restart(blockspace_env: BlockspaceEnv) -> None:
    make_pool(blockspace_env, CASES["parity-1"])
    roundtrip(blockspace_env, "xfs", seed=7, try_busy_unmount=True)


def test_loop_devices_as_pool_disks(blockspace_env: BlockspaceEnv) -> None:
    """Block devices as disks: their size comes from the BLKGETSIZE64 ioctl, not st_size."""
    env = blockspace_env
    case = CASES["parity-1"]
    images = env.make_images(case.disks)
    disks = [env.attach_loop(image, pool_disk=True) for image in images]
    for disk in disks:
        assert stat.S_ISBLK(os.stat(disk).st_mode)
        assert os.stat(disk).st_size == 0  # what a naive stat-based probe would see
    make_pool(env, case, disks=disks)
    status = env.status("tank")
    assert [d["path"] for d in status["disks"]] == disks
    roundtrip(env, "ext4", seed=11)
    # The data really went through the loop devices into the image files.
    assert all(os.stat(image).st_blocks > 0 for image in images)


@pytest.mark.parametrize("name", ["mirror-2", "parity-1"])
def test_pool_serves_with_a_disk_missing(blockspace_env: BlockspaceEnv, name: str) -> None:
    env = blockspace_env
    case = CASES[name]
    images = env.make_images(case.disks)
    make_pool(env, case, disks=images)
    mountpoint, pid, loop, hashes = populate(env, "ext4", seed=23)
    take_down(env, mountpoint, pid, loop)

    # Take away the disk holding the most of vol0, as if it had been pulled.
    before = env.status("tank")
    victim = max(before["disks"], key=lambda d: d["used_bytes"])
    assert victim["used_bytes"] > 0
    image = Path(victim["path"])
    assert image in images
    image.rename(env.root / "pulled.img")

    mountpoint, pid, loop = verify(env, "ext4", hashes)
    status = env.status("tank")
    assert status["health"] == "degraded"
    assert status["mountpoint"] == str(mountpoint)
    states = {d["id"]: d["state"] for d in status["disks"]}
    assert states.pop(victim["id"]) == "missing"
    assert set(states.values()) == {"online"}
    assert status["volumes"][0]["state"] == "degraded"

    # Still writable while degraded, and what is written then survives another restart.
    hashes |= write_random_files(env.root / "fs", {"degraded/new.bin": 5 * MiB + 3}, seed=29)
    run(["sync"])
    take_down(env, mountpoint, pid, loop)
    mountpoint, pid, loop = verify(env, "ext4", hashes)
    assert env.status("tank")["health"] == "degraded"
    take_down(env, mountpoint, pid, loop)


def test_kill_9_under_mounted_ext4(blockspace_env: BlockspaceEnv) -> None:
    """Everything synced before the daemon is killed is intact; ext4's journal replays."""
    env = blockspace_env
    make_pool(env, CASES["parity-1"])
    mountpoint, pid, loop, hashes = populate(env, "ext4", seed=31)
    fs = env.root / "fs"

    # Unsynced writes in flight at the moment of the kill: they may be lost, but must not
    # damage what was synced before them, nor the file system.
    inflight = fs / "inflight.bin"
    writer = subprocess.Popen(
        ["dd", "if=/dev/urandom", f"of={inflight}", "bs=1M", "count=256",
         "conv=fsync", "status=none"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        # Kill once dd is well under way (its 256 MiB and the fsync take seconds here).
        assert wait_until(lambda: inflight.exists() and inflight.stat().st_size >= 16 * MiB, 30)
        env.kill_daemon(pid)
    finally:
        try:
            writer.wait(timeout=60)
        except subprocess.TimeoutExpired:
            writer.kill()
            writer.wait()
    assert writer.returncode != 0  # its fsync cannot have succeeded: the daemon is gone

    # What an administrator does after a crash.
    env.umount_fs(fs, lazy=True)
    env.detach_loop(loop)
    env.fusermount_lazy(mountpoint)
    pools = env.cli_json("pool", "list")
    assert pools[0]["mountpoint"] is None  # the dead daemon's mount record is dropped

    mountpoint, new_pid = env.mount_pool("tank")
    assert new_pid != pid
    loop = attach_volume(env, mountpoint)
    fs = env.mount_fs(loop, "fs", "ext4")  # replays the journal
    drop_caches()
    found = hash_tree(fs)
    found.pop("inflight.bin", None)
    assert found == hashes
    env.umount_fs(fs)
    check = check_filesystem("ext4", loop)
    assert check.returncode == 0, f"fsck after journal replay:\n{check.stdout}\n{check.stderr}"
    env.detach_loop(loop)
    env.unmount_pool(mountpoint, new_pid)
    assert env.status("tank")["health"] == "online"


def test_volume_files_and_socket_are_root_only(blockspace_env: BlockspaceEnv) -> None:
    """Design invariant 6: 0600 volume files under default_permissions even with allow_other,
    a 0600 control socket; another user can see the file but not open it."""
    env = blockspace_env
    make_pool(env, CASES["mirror-3"])
    mountpoint, pid = env.mount_pool("tank")
    options = next(line for line in Path("/proc/self/mounts").read_text().splitlines()
                   if line.split()[1] == str(mountpoint)).split()[3].split(",")
    assert "allow_other" in options
    assert "default_permissions" in options

    volume_file = mountpoint / "vol0"
    info = os.stat(volume_file)
    assert stat.S_ISREG(info.st_mode)
    assert stat.S_IMODE(info.st_mode) == 0o600
    assert (info.st_uid, info.st_gid) == (0, 0)

    mount_record = env.cli_json("pool", "status", "tank")
    assert mount_record["mountpoint"] == str(mountpoint)
    socket_path = env.state_dir / "run" / "tank.sock"
    sock = os.stat(socket_path)
    assert stat.S_ISSOCK(sock.st_mode)
    assert stat.S_IMODE(sock.st_mode) == 0o600
    assert sock.st_uid == 0

    def as_nobody(*command: str) -> subprocess.CompletedProcess[str]:
        return run([tool("setpriv"), "--reuid=65534", "--regid=65534", "--clear-groups",
                    *command], check=False)

    # The path is traversable for others, so a refusal below comes from the file's mode.
    seen = as_nobody("stat", "-c", "%a %u", str(volume_file))
    assert seen.returncode == 0, seen.stderr
    assert seen.stdout.split() == ["600", "0"]
    listing = as_nobody("ls", str(mountpoint))
    assert listing.stdout.split() == ["vol0"]

    for command in (
        ["dd", f"if={volume_file}", "of=/dev/null", "bs=4096", "count=1"],
        ["dd", "if=/dev/zero", f"of={volume_file}", "bs=4096", "count=1", "conv=notrunc"],
    ):
        denied = as_nobody(*command)
        assert denied.returncode != 0
        assert "Permission denied" in denied.stderr, denied.stderr

    # The control socket: its directory is closed to others, and so is the socket itself
    # (checked with the directory opened up for a moment).
    run_dir = socket_path.parent
    assert stat.S_IMODE(os.stat(run_dir).st_mode) == 0o700
    connect = (
        "import socket, sys\n"
        "s = socket.socket(socket.AF_UNIX)\n"
        f"try: s.connect({str(socket_path)!r})\n"
        "except PermissionError: sys.exit(13)\n"
    )
    python = system_python()
    assert as_nobody(python, "-c", connect).returncode == 13
    for directory in (env.state_dir, run_dir):
        directory.chmod(0o711)
    try:
        talk = as_nobody(python, "-c", connect)
    finally:
        for directory in (env.state_dir, run_dir):
            directory.chmod(0o700)
    assert talk.returncode == 13, (talk.returncode, talk.stderr)

    # Root still can, and the daemon answers.
    with open(volume_file, "rb") as handle:
        assert handle.read(4096) == bytes(4096)
    env.unmount_pool(mountpoint, pid)
    assert not socket_path.exists()


def test_cleanup_takes_down_what_a_failed_test_leaves() -> None:
    """The fixture's promise: whatever a test leaves behind (a live stack on loop-device
    disks, or one whose daemon was killed under a mounted ext4) is taken down, and only that."""
    live, dead = BlockspaceEnv.create(), BlockspaceEnv.create()
    try:
        images = live.make_images(CASES["mirror-2"].disks)
        disks = [live.attach_loop(image, pool_disk=True) for image in images]
        make_pool(live, CASES["mirror-2"], disks=disks)
        populate(live, "ext4", seed=41)

        make_pool(dead, CASES["simple"])
        _, pid, _, _ = populate(dead, "ext4", seed=43)
        dead.kill_daemon(pid)

        for env in (live, dead):
            root = str(env.root)
            assert env.cleanup() == []
            assert not [m for m in mounts() if m.startswith(root)]
            backing = [loop_backing_file(f"/dev/{n}") for n in os.listdir("/sys/block")
                       if n.startswith("loop")]
            assert not [b for b in backing if b and b.startswith(root)]
            assert not any(process_alive(pid) for pid in env.daemons)
            assert not env.root.exists()
    finally:
        for env in (live, dead):
            env.cleanup()


def test_failed_mount_says_why_and_leaves_nothing(blockspace_env: BlockspaceEnv) -> None:
    env = blockspace_env
    images = env.make_images(CASES["mirror-2"].disks)
    make_pool(env, CASES["mirror-2"], disks=images)
    for image in images:
        image.rename(image.with_suffix(".gone"))
    mountpoint = env.root / "pool-tank"
    mountpoint.mkdir()
    env.fuse_mounts.append(mountpoint)
    failed = env.cli("mount", "tank", str(mountpoint), check=False)
    assert failed.returncode != 0
    assert not is_mounted(mountpoint)
    assert not (env.state_dir / "run" / "tank.json").exists()
    assert not (env.state_dir / "run" / "tank.sock").exists()
    # Invariant 4: one clear line that says what is wrong.
    assert "no disk of this pool was found" in failed.stderr, failed.stderr


def test_sigterm_unmounts_cleanly(blockspace_env: BlockspaceEnv) -> None:
    env = blockspace_env
    make_pool(env, CASES["simple"])
    mountpoint, pid = env.mount_pool("tank")
    os.kill(pid, signal.SIGTERM)
    assert wait_exited(pid, 30)
    assert str(mountpoint) not in mounts()
    env.fuse_mounts.remove(mountpoint)
    assert not (env.state_dir / "run" / "tank.json").exists()
    assert not (env.state_dir / "run" / "tank.sock").exists()
