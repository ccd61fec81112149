"""The machinery of the integration tier: real FUSE mounts, loop devices, mkfs and fsck.

`BlockspaceEnv` runs the `blockspace` CLI against its own state directory and remembers every
FUSE mount, loop device, file-system mount and daemon pid it creates, so `cleanup()` can take
them all down again in the right order (file systems, then loops on volume files, then the
pool mounts, then the daemons, then loops used as pool disks) even after a failed test or a
`kill -9`. It never touches a mount, loop device or process it did not create.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from blockspace.cli import main as cli

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30

CLI_TIMEOUT = 120.0  # seconds for one CLI or system command; nothing here should come close
# Search these too: a non-login root shell may lack the sbin directories in PATH.
TOOL_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin"])
REQUIRED_TOOLS = (
    "losetup", "blockdev", "setpriv", "mount", "umount", "fusermount3", "mkfs.ext4", "fsck.ext4",
)


class CommandFailed(AssertionError):
    """A command exited non-zero (or timed out); the message carries its whole output."""


def tool(name: str) -> str:
    path = shutil.which(name, path=TOOL_PATH)
    if path is None:
        raise CommandFailed(f"{name} is not installed")
    return path


def have_tool(name: str) -> bool:
    return shutil.which(name, path=TOOL_PATH) is not None


def system_python() -> str:
    """A python3 any user can run (the venv's may live under root's home)."""
    return shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin") or sys.executable


def missing_prerequisites() -> str | None:
    """Why the integration tier cannot run here, or None when it can."""
    reasons = []
    if os.geteuid() != 0:
        reasons.append("not running as root")
    for device in ("/dev/fuse", "/dev/loop-control"):
        if not os.path.exists(device):
            reasons.append(f"{device} is missing")
    for name in REQUIRED_TOOLS:
        if not have_tool(name):
            reasons.append(f"{name} not found")
    if not reasons:
        return None
    return "integration tests need root, /dev/fuse, loop devices and e2fsprogs: " + ", ".join(
        reasons
    )


def run(
    cmd: Sequence[str],
    *,
    check: bool = True,
    timeout: float = CLI_TIMEOUT,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    try:
        result = subprocess.run(
            list(cmd),
            capture_output=True,
            text=True,
            timeout=timeout,
            env=dict(env) if env is not None else None,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as error:
        raise CommandFailed(f"timed out after {timeout}s: {' '.join(cmd)}") from error
    if check and result.returncode != 0:
        raise CommandFailed(
            f"exit {result.returncode}: {' '.join(cmd)}\n"
            f"stdout: {result.stdout.strip()}\nstderr: {result.stderr.strip()}"
        )
    return result


# ---- the kernel's view: mounts, loop devices, processes ------------------------------------


def _unescape_mount_path(text: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), text)


def mounts() -> dict[str, str]:
    """Mount point -> file-system type, from /proc/self/mountinfo.

    Never stat a mount point to find out: a FUSE mount whose daemon died answers ENOTCONN.
    """
    found = {}
    with open("/proc/self/mountinfo") as table:
        for line in table:
            fields = line.split()
            separator = fields.index("-")
            found[_unescape_mount_path(fields[4])] = fields[separator + 1]
    return found


def is_mounted(path: Path | str) -> bool:
    return os.path.abspath(path) in mounts()


def loop_backing_file(device: str) -> str | None:
    """The file behind /dev/loopN, or None when the device is not attached."""
    name = os.path.basename(device)
    try:
        with open(f"/sys/block/{name}/loop/backing_file") as handle:
            return handle.read().strip().removesuffix(" (deleted)")
    except FileNotFoundError:
        return None


def process_alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            state = handle.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state != "Z"


def is_blockspace_process(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return b"blockspace" in handle.read()
    except OSError:
        return False


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)


def wait_exited(pid: int, timeout: float) -> bool:
    return wait_until(lambda: not process_alive(pid), timeout)


def wait_detached(device: str, timeout: float) -> bool:
    return wait_until(lambda: loop_backing_file(device) is None, timeout)


def wait_unmounted(mountpoint: Path, timeout: float) -> bool:
    return wait_until(lambda: not is_mounted(mountpoint), timeout)


def drop_caches() -> None:
    """Make the next reads come from the volume, not from the page cache."""
    os.sync()
    with contextlib.suppress(OSError):  # read-only /proc/sys (containers): best effort
        with open("/proc/sys/vm/drop_caches", "w") as handle:
            handle.write("3\n")


# ---- file content ---------------------------------------------------------------------------

# Odd sizes on purpose: partial blocks, a file spanning many slabs' worth of rows, nesting.
STANDARD_FILES: dict[str, int] = {
    "tiny.txt": 1,
    "small/page.bin": 4 * KiB,
    "small/odd.bin": 12_345,
    "medium.bin": 3 * MiB + 17,
    "nested/dir/deep/file.bin": 700 * KiB,
    "big.bin": 16 * MiB + 4097,
}


def write_random_files(
    directory: Path, sizes: Mapping[str, int], seed: int, *, fsync: bool = True
) -> dict[str, str]:
    """Write reproducible random files; return relative path -> sha256."""
    rng = random.Random(seed)
    hashes = {}
    for relative, size in sizes.items():
        path = directory / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        with open(path, "wb") as handle:
            remaining = size
            while remaining:
                chunk = rng.randbytes(min(remaining, 4 * MiB))
                handle.write(chunk)
                digest.update(chunk)
                remaining -= len(chunk)
            handle.flush()
            if fsync:
                os.fsync(handle.fileno())
        hashes[relative] = digest.hexdigest()
    return hashes


def hash_tree(directory: Path) -> dict[str, str]:
    """sha256 of every regular file below `directory` (lost+found left out)."""
    hashes = {}
    for path in sorted(directory.rglob("*")):
        relative = path.relative_to(directory)
        if relative.parts[0] == "lost+found" or not path.is_file():
            continue
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            while chunk := handle.read(4 * MiB):
                digest.update(chunk)
        hashes[str(relative)] = digest.hexdigest()
    return hashes


def check_filesystem(fstype: str, device: str) -> subprocess.CompletedProcess[str]:
    """Read-only check of an unmounted file system; exit code 0 means clean."""
    if fstype == "ext4":
        return run([tool("fsck.ext4"), "-fn", device], check=False)
    if fstype == "xfs":
        return run([tool("xfs_repair"), "-n", device], check=False)
    raise ValueError(fstype)


# ---- the environment -----------------------------------------------------------------------


class BlockspaceEnv:
    """A private scratch area for one test: disk images, state dir, mount points."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.state_dir = root / "state"
        self.images_dir = root / "images"
        self.images_dir.mkdir()
        self.fuse_mounts: list[Path] = []  # pool mount points
        self.fs_mounts: list[Path] = []  # ext4/xfs mount points
        self.volume_loops: list[str] = []  # loop devices on volume files
        self.disk_loops: list[str] = []  # loop devices used as pool disks
        self.daemons: list[int] = []  # pids of the mount daemons we started

    @classmethod
    def create(cls) -> BlockspaceEnv:
        # Not pytest's tmp_path: its parents are 0700 (the permission test needs a path other
        # users can traverse) and pytest deletes old ones, which must never happen while
        # something is still mounted below. We remove ours only once nothing is.
        root = Path(tempfile.mkdtemp(prefix="blockspace-it-"))
        root.chmod(0o755)
        return cls(root)

    # ---- CLI ----------------------------------------------------------------------------

    def cli(
        self, *args: str, check: bool = True, timeout: float = CLI_TIMEOUT,
        state_dir: Path | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """The CLI on this env's state directory (or `state_dir`: a second registry of the
        same host, as another admin's would be)."""
        state = str(state_dir or self.state_dir)
        env = dict(os.environ, BLOCKSPACE_STATE_DIR=state)
        command = [sys.executable, "-m", "blockspace", "--state-dir", state, *args]
        return run(command, check=check, timeout=timeout, env=env)

    def cli_json(self, *args: str, state_dir: Path | None = None) -> Any:
        return json.loads(self.cli("--json", *args, state_dir=state_dir).stdout)

    def status(self, pool: str) -> dict[str, Any]:
        result: dict[str, Any] = self.cli_json("pool", "status", pool)
        return result

    def volume_status(self, pool: str, volume: str) -> dict[str, Any]:
        for record in self.status(pool)["volumes"]:
            if record["name"] == volume:
                return dict(record)
        raise AssertionError(f"no volume {volume!r} in pool {pool!r}")

    # ---- disks and pools ------------------------------------------------------------------

    def make_images(self, sizes: Sequence[int]) -> list[Path]:
        """Sparse image files disk0.img, disk1.img, ... of the given sizes."""
        images = []
        for index, size in enumerate(sizes):
            path = self.images_dir / f"disk{index}.img"
            with open(path, "xb") as handle:
                handle.truncate(size)
            images.append(path)
        return images

    def create_pool(
        self, name: str, disks: Sequence[Path | str], *, slab_size: str = "32M"
    ) -> dict[str, Any]:
        status: dict[str, Any] = self.cli_json(
            "pool", "create", name, *map(str, disks), "--slab-size", slab_size
        )
        return status

    def create_volume(
        self, pool: str, name: str, size: str, resiliency: str, *options: str
    ) -> dict[str, Any]:
        record: dict[str, Any] = self.cli_json(
            "volume", "create", pool, name, "--size", size, "--resiliency", resiliency, *options
        )
        return record

    def mount_pool(self, pool: str, *flags: str) -> tuple[Path, int]:
        """Mount `pool` at ROOT/pool-POOL (extra `mount` flags allowed); returns the mount
        point and the daemon's pid."""
        mountpoint = self.root / f"pool-{pool}"
        mountpoint.mkdir(exist_ok=True)
        mountpoint.chmod(0o755)
        self.fuse_mounts.append(mountpoint)  # before mounting: a half-done mount is cleaned too
        try:
            info = self.cli_json("mount", pool, str(mountpoint), *flags)
        except CommandFailed as error:
            raise CommandFailed(f"{error}\ndaemon log:\n{self.daemon_log(pool)}") from None
        pid = int(info["pid"])
        self.daemons.append(pid)
        assert info["mountpoint"] == str(mountpoint)
        assert mounts().get(str(mountpoint)) == "fuse.blockspace", mounts().get(str(mountpoint))
        return mountpoint, pid

    def daemon_log(self, pool: str, lines: int = 40) -> str:
        try:
            text = (self.state_dir / "log" / f"{pool}.log").read_text(errors="replace")
        except OSError as error:
            return f"(no log: {error})"
        return "\n".join(text.splitlines()[-lines:])

    def unmount_pool(self, mountpoint: Path, pid: int, *, force: bool = False) -> None:
        """`blockspace unmount`, then the daemon must be gone and the mount with it."""
        self.cli("unmount", str(mountpoint), *(["--force"] if force else []))
        assert wait_exited(pid, 30), f"daemon {pid} still running after unmount"
        assert not is_mounted(mountpoint), f"{mountpoint} still mounted"
        self.fuse_mounts.remove(mountpoint)

    def kill_daemon(self, pid: int) -> None:
        assert pid in self.daemons
        os.kill(pid, signal.SIGKILL)
        assert wait_exited(pid, 30), f"daemon {pid} survived SIGKILL"

    def fusermount_lazy(self, mountpoint: Path) -> None:
        """What an admin does after the daemon died: detach the dead FUSE mount."""
        run([tool("fusermount3"), "-u", "-z", str(mountpoint)])
        assert not is_mounted(mountpoint)
        self.fuse_mounts.remove(mountpoint)

    # ---- loop devices, file systems ----------------------------------------------------------

    def attach_loop(self, path: Path, *, pool_disk: bool = False) -> str:
        """losetup -f --show; a volume file gets --direct-io=on (no second page cache)."""
        command = [tool("losetup"), "-f", "--show"]
        if not pool_disk:
            command.append("--direct-io=on")
        device = run([*command, str(path)]).stdout.strip()
        assert device.startswith("/dev/loop"), device
        (self.disk_loops if pool_disk else self.volume_loops).append(device)
        return device

    def detach_loop(self, device: str) -> None:
        run([tool("losetup"), "-d", device])
        # A loop still held (a lazily unmounted file system) autoclears when released.
        assert wait_detached(device, 30), f"{device} still attached after losetup -d"
        for tracked in (self.volume_loops, self.disk_loops):
            if device in tracked:
                tracked.remove(device)

    def mkfs(self, fstype: str, device: str) -> None:
        if fstype == "ext4":
            run([tool("mkfs.ext4"), "-q", "-F", "-E", "nodiscard", device])
        elif fstype == "xfs":
            run([tool("mkfs.xfs"), "-q", "-f", "-K", device])
        else:
            raise ValueError(fstype)

    def mount_fs(self, device: str, name: str, fstype: str) -> Path:
        mountpoint = self.root / name
        mountpoint.mkdir(exist_ok=True)
        # errors=remount-ro: a dying volume must never take the kernel down with it
        options = ["-o", "errors=remount-ro"] if fstype == "ext4" else []
        self.fs_mounts.append(mountpoint)
        run([tool("mount"), "-t", fstype, *options, device, str(mountpoint)])
        return mountpoint

    def umount_fs(self, mountpoint: Path, *, lazy: bool = False) -> None:
        run([tool("umount"), *(["-l"] if lazy else []), str(mountpoint)])
        assert not is_mounted(mountpoint)
        self.fs_mounts.remove(mountpoint)

    # ---- teardown -------------------------------------------------------------------------------

    def _owned_loop(self, device: str) -> bool:
        backing = loop_backing_file(device)
        return backing is not None and backing.startswith(str(self.root) + os.sep)

    def _unmount_path(self, mountpoint: Path, problems: list[str]) -> None:
        for attempt in range(3):
            if not is_mounted(mountpoint):
                return
            if run([tool("umount"), str(mountpoint)], check=False).returncode == 0:
                continue
            time.sleep(0.2 * (attempt + 1))
        if is_mounted(mountpoint):
            result = run([tool("umount"), "-l", str(mountpoint)], check=False)
            if result.returncode != 0:
                problems.append(f"umount -l {mountpoint}: {result.stderr.strip()}")

    def _detach(self, devices: list[str], problems: list[str]) -> None:
        for device in reversed(devices):
            if not self._owned_loop(device):
                continue  # already gone (or the number now belongs to someone else)
            result = run([tool("losetup"), "-d", device], check=False)
            if result.returncode != 0:
                problems.append(f"losetup -d {device}: {result.stderr.strip()}")
            elif not wait_detached(device, 10):
                problems.append(f"{device} still attached after losetup -d")
        devices.clear()

    def cleanup(self) -> list[str]:
        """Take down everything this env created; returns what it found it had to fix
        the hard way or could not fix (empty when the test had already cleaned up)."""
        problems: list[str] = []
        steps = [
            self._cleanup_file_systems,
            self._cleanup_volume_loops,
            self._cleanup_pools,
            self._cleanup_daemons,
            self._cleanup_disk_loops,
        ]
        for step in steps:
            try:
                step(problems)
            except Exception as error:  # keep going: later steps still matter
                problems.append(f"{step.__name__}: {error!r}")
        leftovers = [m for m in mounts() if m == str(self.root) or m.startswith(f"{self.root}/")]
        if leftovers:
            problems.append(f"still mounted, {self.root} kept: {leftovers}")
        else:
            shutil.rmtree(self.root, ignore_errors=True)
        return problems

    def _cleanup_file_systems(self, problems: list[str]) -> None:
        for mountpoint in reversed(self.fs_mounts):
            self._unmount_path(mountpoint, problems)
        self.fs_mounts.clear()

    def _cleanup_volume_loops(self, problems: list[str]) -> None:
        self._detach(self.volume_loops, problems)

    def _cleanup_pools(self, problems: list[str]) -> None:
        for mountpoint in reversed(self.fuse_mounts):
            if not is_mounted(mountpoint):
                continue
            # The polite way first; it fails at once when the daemon is dead.
            result = self.cli("unmount", str(mountpoint), "--force", check=False, timeout=60)
            if result.returncode == 0 and wait_unmounted(mountpoint, 10):
                continue
            result = run([tool("fusermount3"), "-u", "-z", str(mountpoint)], check=False)
            if result.returncode != 0:
                problems.append(f"fusermount3 -u -z {mountpoint}: {result.stderr.strip()}")
        self.fuse_mounts.clear()

    def _cleanup_daemons(self, problems: list[str]) -> None:
        for pid in self.daemons:
            if wait_exited(pid, 10) or not is_blockspace_process(pid):
                continue
            os.kill(pid, signal.SIGTERM)
            if wait_exited(pid, 10):
                problems.append(f"daemon {pid} outlived its unmount (SIGTERM ended it)")
                continue
            os.kill(pid, signal.SIGKILL)
            problems.append(f"daemon {pid} needed SIGKILL")
            if not wait_exited(pid, 10):
                problems.append(f"daemon {pid} survives SIGKILL")
        self.daemons.clear()

    def _cleanup_disk_loops(self, problems: list[str]) -> None:
        self._detach(self.disk_loops, problems)


class InProcessCLI:
    """`blockspace` run in this process (python start-up costs seconds on a busy machine),
    except `mount`; the mount daemons are separate processes, as they always are."""

    def __init__(self, env: BlockspaceEnv, capsys: pytest.CaptureFixture[str]) -> None:
        self.env = env
        self.capsys = capsys

    def __call__(self, *args: str) -> tuple[int, str, str]:
        self.capsys.readouterr()
        code = cli.main(["--state-dir", str(self.env.state_dir), *args])
        out, err = self.capsys.readouterr()
        return code, out, err

    def json(self, *args: str) -> Any:
        code, out, err = self("--json", *args)
        assert code == 0, err
        return json.loads(out)

    def mount(self, *flags: str) -> tuple[Path, int]:
        mountpoint = self.env.root / "pool-tank"
        mountpoint.mkdir(exist_ok=True)
        self.env.fuse_mounts.append(mountpoint)  # the env's teardown unmounts it if we fail
        # A process of its own: `mount` leaves the daemon's Popen and log file to its exit.
        info = self.env.cli_json("mount", "tank", str(mountpoint), *flags)
        self.env.daemons.append(int(info["pid"]))
        return mountpoint, int(info["pid"])

    def unmount(self, mountpoint: Path, pid: int) -> None:
        code, _, err = self("unmount", str(mountpoint), "--force")
        assert code == 0, err
        assert wait_exited(pid, 30)
        self.env.fuse_mounts.remove(mountpoint)
