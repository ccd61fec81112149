"""The kernel-fault scenario runner.

Runs on a kernel that has device-mapper: inside the lab VM (`tools/vmlab scenarios`, which
boots a VM and calls this with --in-vm), or directly on a disposable machine such as the
vagrant/ VM (`tools/vmlab scenarios --direct`). Every scenario builds its own world in a
scratch directory: sparse image files -> loop devices -> device-mapper targets (the fault
layer) -> a Blockspace pool on /dev/mapper/* -> a volume -> mount -> losetup -> mkfs.ext4 ->
files with known hashes. It injects its fault, then checks every hash (after dropping the
caches, so the bytes come from the disks) and `e2fsck -fn`, and tears everything down.

Verdicts: `pass`; `FAIL`; `expected failure (<why>)` when a scenario that needs a feature
not built yet fails, as declared in EXPECTED_FAILURES. The check itself is the same either
way: when the feature lands the scenario passes and the table says so
(`pass (unexpected: ...)` until the entry is removed from EXPECTED_FAILURES).

The Blockspace CLI is called in-process (`blockspace.cli.main.main`) and the mount daemon is
forked from this process: under TCG a Python start costs ~10 s, so the runner imports
Blockspace once.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import hashlib
import io
import json
import os
import random
import select
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

TOOLS = Path(__file__).resolve().parents[1]
REPO = TOOLS.parent
MIB = 1 << 20


def _ensure_blockspace(argv: list[str]) -> None:
    """Import blockspace, re-executing under the project's virtualenv if this python lacks it."""
    try:
        import blockspace.cli.main  # noqa: F401
    except ImportError:
        venv_python = REPO / ".venv" / "bin" / "python"
        if venv_python.exists() and Path(sys.executable).resolve() != venv_python.resolve():
            os.execv(str(venv_python), [str(venv_python), str(TOOLS / "vmlab"), "scenarios",
                                        "--direct", *argv])
        raise SystemExit("vmlab: blockspace is not importable (run `make setup`)") from None


from vmlab_lib import dmtools, logwrites  # noqa: E402
from vmlab_lib.dmtools import CommandFailed, Devices, sh  # noqa: E402

# --------------------------------------------------------------------------------------------
# configuration

DISK_SIZE = 128 * MIB
SLAB_SIZE = "8M"
META_SIZE = "256K"
VOLUME_SIZE = "32M"
FILE_SIZE = 128 * 1024
BEFORE, AFTER = 6, 10  # files written before and after a fault is injected
POWER_CUTS = 1  # random marks per power-cut scenario (plus one after the final sync)
# The hang scenario mounts with `--io-timeout HANG_IO_TIMEOUT` and fails if the volume stalls
# longer than HANG_DEADLINE (the timeout plus room for TCG).
HANG_IO_TIMEOUT = 10
HANG_DEADLINE = 45.0
SCENARIO_TIMEOUT = 240.0

LAYOUTS: dict[str, tuple[int, int, list[str]]] = {
    # name: (disks, tolerance, volume create options)
    "mirror-2": (2, 1, ["--resiliency", "mirror", "--copies", "2"]),
    "mirror-3": (3, 2, ["--resiliency", "mirror", "--copies", "3"]),
    "parity-1": (3, 1, ["--resiliency", "parity", "--parity", "1", "--columns", "2"]),
    "parity-2": (4, 2, ["--resiliency", "parity", "--parity", "2", "--columns", "2"]),
}

# The CLI the replace scenario uses (issue 4 names it `disk replace OLD NEW`); adjust here if
# the command lands under another spelling.
REPLACE_COMMAND = ["disk", "replace"]

# Scenarios that need a feature not built yet: (scenario, layout or "*") -> (why, stage).
# A failure counts as expected only in that stage: "fault" = after the fault was injected,
# "feature" = at the step that uses the missing feature. Anything failing earlier (building
# the pool, mkfs, ...) is a plain FAIL.
# For example: ("hang", "*"): ("needs I/O timeouts, issue 4", "fault"). Every scenario of the
# issue passes against the product as it is now, so the list is empty.
EXPECTED_FAILURES: dict[tuple[str, str], tuple[str, str]] = {}


def expected_failure(name: str, layout: str) -> tuple[str, str] | None:
    return EXPECTED_FAILURES.get((name, layout)) or EXPECTED_FAILURES.get((name, "*"))


# --------------------------------------------------------------------------------------------
# Blockspace, in-process


class Blockspace:
    """The blockspace CLI, called in-process; the mount daemon forked from this process."""

    def __init__(self, state_dir: Path, log: Callable[[str], None]) -> None:
        self.state_dir = state_dir
        self.log = log
        self.daemons: dict[str, int] = {}  # pool -> daemon pid

    def cli(self, *args: str, want_json: bool = False, check: bool = True) -> Any:
        from blockspace.cli import main as cli

        argv = ["--state-dir", str(self.state_dir), *args]
        if want_json:
            argv.append("--json")
        out, err = io.StringIO(), io.StringIO()
        started = time.monotonic()
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                rc = cli.main(argv)
        except SystemExit as exit_:
            rc = exit_.code if isinstance(exit_.code, int) else 1
        except Exception:  # a crash of the CLI is a finding, not a runner error
            rc = 99
            err.write(traceback.format_exc())
        took = time.monotonic() - started
        self.log(f"blockspace {' '.join(args)} -> {rc} ({took:.1f}s)"
                 + (f": {err.getvalue().strip()[-300:]}" if rc else ""))
        if check and rc != 0:
            raise CommandFailed(f"blockspace {' '.join(args)}: exit {rc}: "
                                f"{(err.getvalue() or out.getvalue()).strip()[-500:]}")
        if not want_json:
            return rc, out.getvalue(), err.getvalue()
        if rc != 0:
            return None
        return json.loads(out.getvalue())

    def mount(self, pool: str, mountpoint: Path, log_file: Path, timeout: float = 120,
              options: tuple[str, ...] = ()) -> int:
        """`blockspace mount --foreground` in a forked child; returns once it is serving."""
        from blockspace.cli import main as cli

        read_fd, write_fd = os.pipe()
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the daemon
            rc = 1
            try:
                os.close(read_fd)
                os.setsid()
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                null = os.open(os.devnull, os.O_RDONLY)
                logfd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
                os.dup2(null, 0)
                os.dup2(logfd, 1)
                os.dup2(logfd, 2)
                rc = cli.main(["--state-dir", str(self.state_dir), "mount", "--foreground",
                               "--log-file", str(log_file), "--ready-fd", str(write_fd),
                               *options, pool, str(mountpoint)])
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(rc if isinstance(rc, int) else 1)
        os.close(write_fd)
        started = time.monotonic()
        answer = b""
        try:
            while b"\n" not in answer:
                left = timeout - (time.monotonic() - started)
                ready, _, _ = select.select([read_fd], [], [], max(0.0, left))
                if not ready:
                    raise CommandFailed(f"blockspace mount {pool}: not ready after {timeout}s")
                chunk = os.read(read_fd, 4096)
                if not chunk:
                    break
                answer += chunk
        finally:
            os.close(read_fd)
        text = answer.decode(errors="replace").strip()
        if text != "ok":
            _reap(pid, 10)
            tail = log_file.read_text(errors="replace")[-800:] if log_file.exists() else ""
            raise CommandFailed(f"blockspace mount {pool} failed: {text or 'daemon exited'}"
                                f"\n{tail}")
        self.daemons[pool] = pid
        self.log(f"blockspace mount {pool} {mountpoint} -> ok "
                 f"(daemon {pid}, {time.monotonic() - started:.1f}s)")
        return pid

    def unmount(self, pool: str, *, timeout: float = 60) -> None:
        pid = self.daemons.pop(pool, None)
        try:
            self.cli("unmount", pool, "--timeout", str(int(timeout)))
        finally:
            if pid is not None and not _reap(pid, timeout):
                self.log(f"daemon {pid} did not exit: killed")
                _kill(pid)

    def dead_daemons(self) -> list[str]:
        """Daemons of ours that exited on their own (reaped here), as 'pool: how'."""
        dead = []
        for pool, pid in list(self.daemons.items()):
            with contextlib.suppress(ChildProcessError):
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    del self.daemons[pool]
                    how = (f"exit {os.waitstatus_to_exitcode(status)}"
                           if os.WIFEXITED(status) else f"signal {os.WTERMSIG(status)}")
                    dead.append(f"{pool}: {how}")
        return dead

    def kill(self, pool: str) -> None:
        pid = self.daemons.pop(pool, None)
        if pid is not None:
            _kill(pid)


def _is_mounted(path: Path) -> bool:
    target = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == target for line in f)


def _reap(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return True
        if done:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    _reap(pid, 30)


# --------------------------------------------------------------------------------------------
# files with known hashes


_libc = ctypes.CDLL(None, use_errno=True)


def syncfs(path: Path) -> None:
    """sync(2) for one file system only: a global sync would wait for the dirty pages of
    every device, a hung one of this or of a concurrent scenario included."""
    fd = os.open(path, os.O_RDONLY)
    try:
        if _libc.syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), str(path))
    finally:
        os.close(fd)


def drop_caches(path: Path | None = None) -> None:
    """Write back the file system at `path`, then drop clean caches (page cache of every
    file and block device), so the next reads come from the disks through the daemon."""
    if path is not None:
        syncfs(path)
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


class Files:
    """Files of random bytes on the ext4 under test, and what they must read back as."""

    def __init__(self, root: Path, seed: int) -> None:
        self.root = root
        self.rng = random.Random(seed)
        self.expected: dict[str, str] = {}
        self.sizes: dict[str, int] = {}
        self.count = 0
        self.lock = threading.Lock()

    def write(self, size: int = FILE_SIZE, *, fsync: bool = True) -> str:
        name = f"f{self.count:04d}.bin"
        self.count += 1
        data = self.rng.randbytes(size)
        path = self.root / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        with self.lock:
            self.expected[name] = hashlib.sha256(data).hexdigest()
            self.sizes[name] = size
        return name

    def blocks(self) -> set[bytes]:
        """Digests of every 4 KiB block of every file (to find them on a raw disk)."""
        found = set()
        for name in self.expected:
            data = (self.root / name).read_bytes()
            for start in range(0, len(data) - 4095, 4096):
                found.add(hashlib.blake2b(data[start : start + 4096], digest_size=12).digest())
        return found

    def verify(self, names: list[str] | None = None,
               expected: dict[str, str] | None = None) -> tuple[int, list[str]]:
        """(bytes that read back right, problems). Caches are dropped first."""
        expected = expected if expected is not None else dict(self.expected)
        drop_caches(self.root)
        good, problems = 0, []
        for name in names if names is not None else sorted(expected):
            try:
                data = (self.root / name).read_bytes()
            except OSError as error:
                problems.append(f"{name}: {error.strerror or error}")
                continue
            if hashlib.sha256(data).hexdigest() == expected[name]:
                good += len(data)
            else:
                problems.append(f"{name}: wrong bytes")
        return good, problems


# --------------------------------------------------------------------------------------------
# one scenario's world


@dataclasses.dataclass
class Outcome:
    ok: bool
    checked: int = 0
    detail: str = ""


class ScenarioFailed(Exception):
    pass


class World:
    """Disks, pool, volume, loop device and ext4 of one scenario; torn down by close()."""

    def __init__(self, scratch: Path, tag: str, layout: str, log: Callable[[str], None]) -> None:
        self.dir = scratch
        self.tag = tag
        self.layout = layout
        self.disk_count, self.tolerance, self.volume_options = LAYOUTS[layout]
        self.log = log
        self.devs = Devices(scratch, f"vmlab-{tag}")
        self.bs = Blockspace(scratch / "state", log)
        self.pool = f"lab{tag}"
        self.volume = "vol"
        self.mnt = scratch / "mnt"
        self.fs = scratch / "fs"
        self.disks: list[str] = []  # /dev/mapper paths, in pool order
        self.backing: list[str] = []  # the loop device under each dm disk
        self.sectors = DISK_SIZE // dmtools.SECTOR
        self.vol_loop: str | None = None
        self.fs_mounted = False
        self.files: Files | None = None
        self.daemon_log = scratch / "daemon.log"
        self.stage = "setup"  # -> "fault" once a fault is injected (see EXPECTED_FAILURES)
        self.mount_options: tuple[str, ...] = ()
        self.nbd_dev: str | None = None  # a kernel nbd device attached with nbd-client
        # The volume reached over NBD (mount --nbd, the guest kernel's nbd driver) instead of
        # a loop device on its FUSE file: the *-nbd scenarios.
        self.nbd = False
        self.nbd_sock = scratch / "nbd.sock"
        for d in (self.mnt, self.fs):
            d.mkdir(parents=True, exist_ok=True)

    # building --------------------------------------------------------------------------

    def make_disks(self, count: int | None = None, *, log_writes: bool = False) -> None:
        for i in range(count or self.disk_count):
            image = self.devs.image(f"disk{i}.img", DISK_SIZE)
            loop = self.devs.loop(image)
            self.backing.append(loop)
            if log_writes:
                log_image = self.devs.image(f"disk{i}.log", 4 * DISK_SIZE)
                log_loop = self.devs.loop(log_image)
                table = dmtools.log_writes(loop, log_loop, self.sectors)
            else:
                table = dmtools.linear(loop, self.sectors)
            self.disks.append(self.devs.create(f"d{i}", table))

    def create_pool(self, provisioning: str) -> None:
        self.bs.cli("pool", "create", self.pool, "--slab-size", SLAB_SIZE,
                    "--metadata-size", META_SIZE, "--media", "hdd", *self.disks)
        self.bs.cli("volume", "create", self.pool, self.volume, "--size", VOLUME_SIZE,
                    "--provisioning", provisioning, *self.volume_options)

    def mount_pool(self) -> None:
        nbd = (f"--nbd={self.nbd_sock}",) if self.nbd else ()
        self.bs.mount(self.pool, self.mnt, self.daemon_log, options=self.mount_options + nbd)

    @property
    def vol_dev(self) -> str | None:
        """The block device the ext4 is on: the loop device, or the nbd device."""
        return self.vol_loop or self.nbd_dev

    def attach(self, *, mkfs: bool) -> None:
        """losetup the volume file (or nbd-client the export), mkfs (first time), mount the
        ext4."""
        if self.nbd:
            self.nbd_dev = nbd_attach(self.nbd_sock, self.volume)
            self.log(f"{self.nbd_dev}: nbd-client on export {self.volume} at {self.nbd_sock}")
        else:
            self.vol_loop = self.devs.loop(self.mnt / self.volume, direct_io=True)
        dev = self.vol_dev
        assert dev is not None
        if mkfs:
            sh("mkfs.ext4", "-q", "-F", "-b", "4096", "-N", "1024", "-E",
               "nodiscard,lazy_itable_init=0,lazy_journal_init=1", dev, timeout=300)
        result = sh("mount", "-t", "ext4", dev, str(self.fs), timeout=120, check=False)
        if result.returncode != 0:
            raise ScenarioFailed(f"mount -t ext4 {dev} failed: {_dmesg_tail()}")
        self.fs_mounted = True

    def build(self, *, log_writes: bool = False, provisioning: str = "fixed") -> Files:
        """Disks, pool, one volume, ext4 on it. Fault scenarios use a fixed volume (every
        slab placed up front) so they test degraded I/O, not allocation while degraded,
        which the thin-degraded scenario covers on its own."""
        started = time.monotonic()
        self.make_disks(log_writes=log_writes)
        self.create_pool(provisioning)
        self.mount_pool()
        self.attach(mkfs=True)
        self.files = Files(self.fs, seed=int(self.tag) if self.tag.isdigit() else 1)
        self.log(f"world ready in {time.monotonic() - started:.1f}s")
        return self.files

    # faults ----------------------------------------------------------------------------

    def inject(self, i: int, table: str, what: str) -> None:
        """Put a fault under disk i (a new dm table, swapped in live)."""
        if self.stage == "setup":
            self.stage = "fault"
        self.devs.reload(f"d{i}", table)
        self.log(f"disk {i}: {what}")

    def restore(self, i: int) -> None:
        self.devs.reload(f"d{i}", dmtools.linear(self.backing[i], self.sectors))

    # checking --------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        data = self.bs.cli("pool", "status", self.pool, want_json=True, check=False)
        if data is None:
            raise ScenarioFailed("pool status failed")
        return data

    def disk_status(self, status: dict[str, Any], i: int) -> dict[str, Any]:
        for disk in status.get("disks", []):
            if os.path.realpath(disk.get("path", "")) == os.path.realpath(self.disks[i]):
                return disk
        raise ScenarioFailed(f"disk {self.disks[i]} not in pool status")

    def fsck(self) -> tuple[bool, str]:
        """Unmount the ext4 and run e2fsck -fn on the volume's loop (or nbd) device."""
        self.umount_fs()
        assert self.vol_dev is not None
        result = sh("e2fsck", "-fn", self.vol_dev, check=False, timeout=300)
        self.log(f"e2fsck -fn -> {result.returncode}")
        text = (result.stdout + result.stderr).strip().splitlines()
        return result.returncode == 0, "; ".join(text[-3:])

    def verify_and_fsck(self) -> Outcome:
        assert self.files is not None
        good, problems = self.files.verify()
        clean, fsck_text = self.fsck()
        self.log(f"verified {good} bytes, {len(problems)} problems")
        if problems:
            return Outcome(False, good, f"{len(problems)} files wrong: {problems[:3]}")
        if not clean:
            return Outcome(False, good, f"e2fsck -fn: {fsck_text}")
        return Outcome(True, good)

    # teardown --------------------------------------------------------------------------

    def umount_fs(self) -> None:
        if self.fs_mounted:
            if sh("umount", str(self.fs), check=False, timeout=120).returncode != 0:
                sh("umount", "-l", str(self.fs), check=False)
            self.fs_mounted = False

    def detach(self) -> None:
        self.umount_fs()
        self.detach_nbd()
        if self.vol_loop is not None:
            self.devs.detach_loop(self.vol_loop)
            self.vol_loop = None

    def unmount_pool(self) -> None:
        self.detach()
        if self.pool in self.bs.daemons:
            self.bs.unmount(self.pool)

    def abort(self) -> None:
        """Unstick everything: plain tables under every disk, abort the FUSE connection,
        kill the daemon. Used by the watchdog when a scenario overruns."""
        for i in range(len(self.backing)):
            with contextlib.suppress(CommandFailed):
                self.restore(i)
        with contextlib.suppress(OSError):
            conn = os.minor(os.stat(self.mnt).st_dev)  # this mount's FUSE connection
            Path(f"/sys/fs/fuse/connections/{conn}/abort").write_text("1")
        self.bs.kill(self.pool)

    def detach_nbd(self) -> None:
        if self.nbd_dev is not None:
            nbd_detach(self.nbd_dev)
            self.nbd_dev = None

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.umount_fs()
        with contextlib.suppress(Exception):
            self.detach_nbd()
        if self.vol_loop is not None:
            with contextlib.suppress(Exception):
                self.devs.detach_loop(self.vol_loop)
            self.vol_loop = None
        if self.pool in self.bs.daemons:
            try:
                self.bs.unmount(self.pool, timeout=30)
            except Exception as error:
                self.log(f"unmount failed ({error}); killing the daemon")
                self.bs.kill(self.pool)
        if _is_mounted(self.mnt):  # a daemon that died leaves its FUSE mount behind
            sh("umount", "-l", str(self.mnt), check=False)
        self.devs.close()


# --------------------------------------------------------------------------------------------
# scenarios


def _write(files: Files, count: int, *, every_fsync: bool = True) -> list[str]:
    return [files.write(fsync=every_fsync) for _ in range(count)]


def _disks_out(world: World, disks: list[int]) -> str | None:
    """None if every disk in `disks` is out of service or has errors counted in pool
    status; else why not (the fault was never seen by the pool)."""
    status = world.status()
    for i in disks:
        disk = world.disk_status(status, i)
        errors = sum((disk.get("errors") or {}).values())
        if disk.get("state") == "online" and errors == 0:
            return f"disk {i} is still online with no errors: the fault was never seen"
    return None


def _checked(world: World, outcome: Outcome, disks: list[int]) -> Outcome:
    if outcome.ok:
        not_seen = _disks_out(world, disks)
        if not_seen:
            return Outcome(False, outcome.checked, not_seen)
    return outcome


def nbd_attach(sock: Path, volume: str) -> str:
    """The guest kernel's nbd driver on export `volume` at `sock` (nbd-client; the host
    kernel here has no nbd module); the /dev/nbdN it took."""
    if dmtools.modprobe("nbd"):
        raise ScenarioFailed("no nbd module in this kernel")
    dev = next((f"/dev/nbd{i}" for i in range(16)
                if not Path(f"/sys/block/nbd{i}/pid").exists()), None)
    if dev is None:
        raise ScenarioFailed("no free /dev/nbdN")
    sh("nbd-client", "-u", "-N", volume, "-b", "4096", str(sock), dev, timeout=60)
    return dev


def nbd_detach(dev: str) -> None:
    sh("nbd-client", "-d", dev, check=False, timeout=60)


NBD_VOLUME_SIZE = "64M"  # 8 slabs of 8 MiB on mirror-2
NBD_FILES, NBD_FILE_SIZE, NBD_DELETED = 5, 4 * MIB, 4  # 16 MiB freed: >= 1 whole slab


def _allocated(world: World) -> int:
    return next(v["allocated"] for v in world.status()["volumes"] if v["name"] == world.volume)


def sc_nbd_fstrim(world: World) -> Outcome:
    """ext4 on a thin volume attached with nbd-client (kernel nbd), files written, most
    deleted, `fstrim`: the volume's allocation in pool status must drop, and what is left must
    read back and fsck clean."""
    world.make_disks()
    world.bs.cli("pool", "create", world.pool, "--slab-size", SLAB_SIZE, "--metadata-size",
                 META_SIZE, "--media", "hdd", *world.disks)
    world.bs.cli("volume", "create", world.pool, world.volume, "--size", NBD_VOLUME_SIZE,
                 "--provisioning", "thin", *world.volume_options)
    world.nbd = True
    world.mount_pool()
    dev = world.nbd_dev = nbd_attach(world.nbd_sock, world.volume)
    sh("mkfs.ext4", "-q", "-F", "-b", "4096", "-E", "lazy_itable_init=0,lazy_journal_init=1",
       dev, timeout=300)
    after_mkfs = _allocated(world)
    sh("mount", "-t", "ext4", dev, str(world.fs), timeout=120)
    world.fs_mounted = True
    files = world.files = Files(world.fs, seed=int(world.tag) if world.tag.isdigit() else 1)
    names = [files.write(NBD_FILE_SIZE) for _ in range(NBD_FILES)]
    syncfs(world.fs)
    written = _allocated(world)
    for name in names[:NBD_DELETED]:
        (world.fs / name).unlink()
        del files.expected[name]
    syncfs(world.fs)
    trimmed = sh("fstrim", "-v", str(world.fs), timeout=300).stdout.strip()
    after_trim = _allocated(world)
    world.log(f"allocated: {after_mkfs >> 20} MiB after mkfs, {written >> 20} MiB written, "
              f"{after_trim >> 20} MiB after rm + fstrim ({trimmed})")
    good, problems = files.verify()
    world.umount_fs()
    result = sh("e2fsck", "-fn", dev, check=False, timeout=300)
    if problems:
        return Outcome(False, good, f"{len(problems)} files wrong: {problems[:3]}")
    if result.returncode != 0:
        return Outcome(False, good, f"e2fsck -fn: {result.stdout.strip()[-200:]}")
    if after_trim >= written:
        return Outcome(False, good, f"fstrim gave nothing back: {written >> 20} MiB allocated "
                       f"before, {after_trim >> 20} MiB after")
    return Outcome(True, good, f"allocated {written >> 20} -> {after_trim >> 20} MiB")


def sc_flakey_down(world: World) -> Outcome:
    files = world.build()
    _write(files, BEFORE)
    victim = world.disk_count - 1
    world.inject(victim, dmtools.flakey(world.backing[victim], world.sectors, 1, 1),
                 "dm-flakey 1s up / 1s down")
    _write(files, AFTER)
    time.sleep(1)
    return _checked(world, world.verify_and_fsck(), [victim])


def sc_error_writes(world: World) -> Outcome:
    files = world.build()
    _write(files, BEFORE)
    victim = 0
    world.inject(victim, dmtools.flakey(world.backing[victim], world.sectors, 0, 3600,
                                        "error_writes"), "dm-flakey error_writes")
    _write(files, AFTER)
    return _checked(world, world.verify_and_fsck(), [victim])


def sc_thin_degraded(world: World) -> Outcome:
    """A thin volume loses a disk (writes fail), then is written where no slab is placed
    yet: the volume must stay writable (place the new slabs on the disks left)."""
    files = world.build(provisioning="thin")
    _write(files, 2)
    victim = 0
    world.inject(victim, dmtools.flakey(world.backing[victim], world.sectors, 0, 3600,
                                        "error_writes"), "dm-flakey error_writes")
    _write(files, 2 * AFTER)
    return _checked(world, world.verify_and_fsck(), [victim])


def sc_drop_writes(world: World) -> Outcome:
    """Writes to one disk vanish without an error (new files and overwrites of old ones);
    nothing wrong may ever be read."""
    files = world.build()
    _write(files, BEFORE)
    victim = 0
    world.inject(victim, dmtools.flakey(world.backing[victim], world.sectors, 0, 3600,
                                        "drop_writes"), "dm-flakey drop_writes")
    _write(files, AFTER)
    for name in list(files.expected)[:BEFORE]:
        data = files.rng.randbytes(files.sizes[name])
        with open(files.root / name, "r+b") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        files.expected[name] = hashlib.sha256(data).hexdigest()
    return world.verify_and_fsck()


def sc_corrupt_writes(world: World) -> Outcome:
    files = world.build()
    _write(files, BEFORE)
    victim = 0
    world.inject(victim, dmtools.flakey(world.backing[victim], world.sectors, 0, 3600,
                                        "corrupt_bio_byte 1 w 90 0"),
                 "dm-flakey corrupt_bio_byte 1 w")
    _write(files, AFTER)
    return world.verify_and_fsck()


def sc_hang(world: World) -> Outcome:
    """One disk stops answering; writes, fsync and reads must go on within HANG_DEADLINE."""
    world.mount_options = ("--io-timeout", str(HANG_IO_TIMEOUT))
    files = world.build()
    _write(files, BEFORE)
    victim = world.disk_count - 1
    world.inject(victim, dmtools.delay(world.backing[victim], world.sectors, 3_600_000),
                 "dm-delay 3600 s (hung)")
    result: dict[str, Any] = {}

    def work() -> None:
        try:
            _write(files, 4)
            result["verify"] = files.verify()
        except BaseException as error:  # noqa: BLE001
            result["error"] = error

    worker = threading.Thread(target=work, daemon=True)
    started = time.monotonic()
    worker.start()
    worker.join(HANG_DEADLINE)
    took = time.monotonic() - started
    if worker.is_alive():
        world.log("stuck tasks (kernel stacks):\n" + _stuck_tasks(
            [os.getpid(), *world.bs.daemons.values()]))
        world.log(f"still stuck after {took:.0f}s: disk {victim} answers again")
        world.restore(victim)
        worker.join(120)
        return Outcome(False, 0, f"I/O stalled > {HANG_DEADLINE:.0f}s while disk {victim} "
                       "hung (went on once it answered)")
    if "error" in result:
        return Outcome(False, 0, f"I/O failed while a disk hung: {result['error']}")
    world.log(f"served in {took:.1f}s with disk {victim} hung")
    good, problems = result["verify"]
    if problems:
        return Outcome(False, good, f"{len(problems)} files wrong: {problems[:3]}")
    world.restore(victim)
    outcome = world.verify_and_fsck()
    outcome.checked += good
    outcome.detail = outcome.detail or f"served in {took:.1f}s with a disk hung"
    return outcome


ZERO_64K = bytes(65536)


def _stuck_tasks(pids: list[int]) -> str:
    """Threads of `pids` that sleep in the kernel, with their kernel stacks."""
    lines = []
    for pid in pids:
        for task in sorted(Path(f"/proc/{pid}/task").glob("*")):
            with contextlib.suppress(OSError):
                stat = (task / "stat").read_text()
                state = stat.rsplit(")", 1)[1].split()[0]
                comm = (task / "comm").read_text().strip()
                stack = [line.split()[-1] for line in (task / "stack").read_text().splitlines()]
                if state == "D" or any("fuse" in f or "sync" in f for f in stack[:6]):
                    lines.append(f"  {pid}/{task.name} {comm} {state}: "
                                 + " < ".join(stack[:8]))
    return "\n".join(lines) or "  (none in D state)"


def _find_data_window(world: World, disk: int, wanted: set[bytes], window: int) -> int | None:
    """Byte offset of the `window`-byte range of a raw disk holding the most file blocks."""
    drop_caches(world.fs)
    hits: list[int] = []
    with open(world.backing[disk], "rb", buffering=0) as dev:
        offset = 0
        while offset < DISK_SIZE:
            chunk = dev.read(MIB)
            if not chunk:
                break
            for part in range(0, len(chunk), 65536):
                if chunk[part : part + 65536] == ZERO_64K:
                    continue  # most of a sparse disk: skip at C speed
                for start in range(part, min(part + 65536, len(chunk)), 4096):
                    block = chunk[start : start + 4096]
                    if hashlib.blake2b(block, digest_size=12).digest() in wanted:
                        hits.append(offset + start)
            offset += len(chunk)
    if not hits:
        return None
    best, best_count, j = hits[0], 0, 0
    for i, start in enumerate(hits):
        while hits[j] <= start - window:
            j += 1
        if i - j + 1 > best_count:
            best_count, best = i - j + 1, hits[j]
    world.log(f"disk {disk}: {len(hits)} file blocks; the {window // 1024} KiB window at "
              f"{best} holds {best_count}")
    return best


def sc_bad_sectors(world: World) -> Outcome:
    """Unreadable sectors right under file data on one disk (dm linear + error): every read
    is served from redundancy. With mirrors the copy that is read first is not known, so
    the range moves to the next disk until a read error is counted."""
    files = world.build()
    _write(files, BEFORE + AFTER)
    wanted = files.blocks()
    window = 256 * 1024
    checked = 0
    for victim in range(world.disk_count):
        start = _find_data_window(world, victim, wanted, window)
        if start is None:
            continue
        sector, count = start // dmtools.SECTOR, window // dmtools.SECTOR
        world.inject(victim, dmtools.bad_range(world.backing[victim], world.sectors, sector,
                                               count), f"linear + error at sectors "
                     f"{sector}+{count}")
        good, problems = files.verify()
        checked += good
        if problems:
            return Outcome(False, checked, f"{len(problems)} files wrong: {problems[:3]}")
        status = world.status()
        disk = world.disk_status(status, victim)
        read_errors = (disk.get("errors") or {}).get("read", 0)
        if read_errors:
            clean, text = world.fsck()
            if not clean:
                return Outcome(False, checked, f"e2fsck -fn: {text}")
            return Outcome(True, checked, f"{read_errors} read errors on disk {victim} served "
                           f"from redundancy; disk {victim} is {disk.get('state')}")
        world.log(f"no read error counted on disk {victim}: the other copy was read")
        world.restore(victim)
    return Outcome(False, checked, "no read error counted on any disk: bad range never read")


ZEROED = 4 * MIB


def sc_zeroed_range(world: World) -> Outcome:
    """A range of one disk under file data turns to zeros (dm linear + zero table, swapped in
    live under the mounted ext4; the range also drops every write): every file reads back
    right while files go on being written, fsck is clean, and the pool counted the damage."""
    files = world.build()
    _write(files, BEFORE + AFTER)
    victim = 0
    start = _find_data_window(world, victim, files.blocks(), 256 * 1024)
    if start is None:
        return Outcome(False, 0, f"no file data found on disk {victim}")
    sector = start // dmtools.SECTOR
    count = min(ZEROED, DISK_SIZE - start) // dmtools.SECTOR
    world.inject(victim, dmtools.zero_range(world.backing[victim], world.sectors, sector,
                                            count), f"linear + zero at sectors {sector}+{count}")
    _write(files, AFTER)
    return _checked(world, world.verify_and_fsck(), [victim])


def sc_tolerance(world: World) -> Outcome:
    """Tolerance-many disks die (every I/O fails) mid-write; writes go on, every byte reads
    back, and the pool mounts again degraded with every byte there."""
    files = world.build()
    _write(files, BEFORE, every_fsync=False)
    victims = list(range(world.disk_count - world.tolerance, world.disk_count))
    for i in victims:
        world.inject(i, dmtools.error(world.sectors), "error target (dead disk)")
    _write(files, AFTER)
    syncfs(world.fs)
    outcome = _checked(world, world.verify_and_fsck(), victims)
    if not outcome.ok:
        return outcome
    world.unmount_pool()
    world.mount_pool()
    world.attach(mkfs=False)
    good, problems = files.verify()
    if problems:
        return Outcome(False, good, f"after remount: {len(problems)} files wrong")
    clean, text = world.fsck()
    if not clean:
        return Outcome(False, good, f"after remount: e2fsck -fn: {text}")
    return Outcome(True, good + outcome.checked, "mounted again degraded, all there")


def sc_replace_rebuild(world: World) -> Outcome:
    """Tolerance-many disks die and are replaced by new ones and rebuilt; then the surviving
    original disks die too, so every byte must come from the rebuilt disks."""
    files = world.build()
    _write(files, BEFORE)
    victims = list(range(world.disk_count - world.tolerance, world.disk_count))
    for i in victims:
        world.inject(i, dmtools.error(world.sectors), "error target (dead disk)")
    _write(files, AFTER)
    syncfs(world.fs)
    world.stage = "feature"
    for n, i in enumerate(victims):
        image = world.devs.image(f"new{n}.img", DISK_SIZE)
        loop = world.devs.loop(image)
        new = world.devs.create(f"n{n}", dmtools.linear(loop, world.sectors))
        rc, out, err = world.bs.cli(*REPLACE_COMMAND, world.pool, world.disks[i], new,
                                    "--wait", check=False)
        if rc != 0:
            lines = (err or out).strip().splitlines()
            return Outcome(False, 0, f"`blockspace {' '.join(REPLACE_COMMAND)}` failed "
                           f"(exit {rc}: {lines[-1][:90] if lines else ''})")
    survivors = [i for i in range(world.disk_count) if i not in victims][: world.tolerance]
    for i in survivors:
        world.inject(i, dmtools.error(world.sectors), "error target (original dies)")
    return world.verify_and_fsck()


def _mark_all(world: World, name: str) -> None:
    """One mark on every disk's log at the same instant: suspend all (in-flight I/O
    completes, no new I/O starts), mark each, resume all."""
    names = [f"d{i}" for i in range(world.disk_count)]
    try:
        for n in names:
            world.devs.suspend(n)
        for n in names:
            world.devs.message(n, "mark", name)
    finally:
        for n in names:
            world.devs.resume(n)


def sc_power_cut(world: World) -> Outcome:
    """dm-log-writes under every disk; marks at random instants while files are written and
    fsynced, and after a final sync; each disk's log replayed to the same mark onto fresh
    disks; the pool must import and mount, ext4 mount (journal replay) and fsck clean, and
    every file fsynced before the mark read back right."""
    files = world.build(log_writes=True, provisioning="thin")
    world.stage = "fault"
    rng = random.Random(int(world.tag) if world.tag.isdigit() else 7)
    marks: list[tuple[str, dict[str, str]]] = []
    errors: list[BaseException] = []
    acked: dict[str, str] = {}

    def writer() -> None:
        try:
            for _ in range(BEFORE + AFTER):
                name = files.write()
                with files.lock:
                    acked[name] = files.expected[name]
        except BaseException as error:  # noqa: BLE001
            errors.append(error)

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    for k in range(POWER_CUTS):
        time.sleep(rng.uniform(1.0, 5.0))
        with files.lock:
            snapshot = dict(acked)
        _mark_all(world, f"cut{k}")
        marks.append((f"cut{k}", snapshot))
        world.log(f"mark cut{k}: {len(snapshot)} files acknowledged")
    thread.join(300)
    if thread.is_alive() or errors:
        return Outcome(False, 0, f"writer failed: {errors[:1] or 'stuck'}")
    syncfs(world.fs)
    _mark_all(world, "synced")
    marks.append(("synced", dict(acked)))
    world.log(f"mark synced: {len(acked)} files acknowledged")
    # What happens after the marks does not matter: the replays throw it away.
    world.unmount_pool()
    logs = [world.dir / f"disk{i}.log" for i in range(world.disk_count)]
    for i in range(world.disk_count):
        world.devs.remove(f"d{i}")
    checked, details = 0, []
    for mark, acknowledged in marks:
        outcome = _replay_and_check(world, logs, mark, acknowledged)
        checked += outcome.checked
        details.append(f"{mark}: {outcome.detail}" if outcome.detail else mark)
        if not outcome.ok:
            return Outcome(False, checked, "; ".join(details))
    return Outcome(True, checked, f"{len(marks)} cuts replayed")


def _replay_and_check(world: World, logs: list[Path], mark: str,
                      acknowledged: dict[str, str]) -> Outcome:
    started = time.monotonic()
    scratch = world.dir / f"replay-{mark}"
    scratch.mkdir()
    devs = Devices(scratch, f"vmlab-{world.tag}r")
    bs = Blockspace(scratch / "state", world.log)
    mnt, fs = scratch / "mnt", scratch / "fs"
    mnt.mkdir()
    fs.mkdir()
    pool = f"{world.pool}r"
    vol_loop = nbd_dev = None
    fs_mounted = False
    passed = False
    try:
        disks = []
        for i, log in enumerate(logs):
            image = devs.image(f"disk{i}.img", DISK_SIZE)
            applied = logwrites.Log(log).replay(image, mark=mark)
            world.log(f"replayed {applied} entries of {log.name} up to mark {mark}")
            disks.append(devs.loop(image))
        rc, out, err = bs.cli("pool", "import", "--name", pool, *disks, check=False)
        if rc != 0:
            return Outcome(False, 0, f"pool import failed after the cut: {err.strip()[-200:]}")
        sock = scratch / "nbd.sock"
        bs.mount(pool, mnt, scratch / "daemon.log",
                 options=(f"--nbd={sock}",) if world.nbd else ())
        if world.nbd:  # the replayed pool is reached the way the cut one was
            dev = nbd_dev = nbd_attach(sock, world.volume)
            world.log(f"{dev}: nbd-client on the replayed pool's export {world.volume}")
        else:
            dev = vol_loop = devs.loop(mnt / world.volume, direct_io=True)
        result = sh("mount", "-t", "ext4", dev, str(fs), check=False, timeout=120)
        if result.returncode != 0:
            return Outcome(False, 0, f"ext4 does not mount after the cut: {_dmesg_tail()}")
        fs_mounted = True
        good, problems = Files(fs, 0).verify(expected=acknowledged)
        sh("umount", str(fs), timeout=120)
        fs_mounted = False
        result = sh("e2fsck", "-fn", dev, check=False, timeout=300)
        if problems:
            return Outcome(False, good, f"{len(problems)} acknowledged files lost or wrong: "
                           f"{problems[:3]}")
        if result.returncode != 0:
            lines = (result.stdout + result.stderr).strip().splitlines()
            return Outcome(False, good, f"e2fsck -fn: {'; '.join(lines[-3:])}")
        world.log(f"cut {mark}: {len(acknowledged)} files ok, fsck clean "
                  f"({time.monotonic() - started:.1f}s)")
        passed = True
        return Outcome(True, good)
    finally:
        if not passed:
            _log_daemon_tail(scratch / "daemon.log", world.log)
        if fs_mounted:
            sh("umount", "-l", str(fs), check=False)
        if vol_loop is not None:
            devs.detach_loop(vol_loop)
        if nbd_dev is not None:
            nbd_detach(nbd_dev)
        if pool in bs.daemons:
            try:
                bs.unmount(pool, timeout=30)
            except Exception:  # noqa: BLE001
                bs.kill(pool)
                sh("umount", "-l", str(mnt), check=False)
        devs.close()
        shutil.rmtree(scratch, ignore_errors=True)


def _dmesg_tail(lines: int = 4) -> str:
    result = sh("dmesg", check=False)
    return " | ".join(result.stdout.strip().splitlines()[-lines:])


def over_nbd(func: Callable[[World], Outcome]) -> Callable[[World], Outcome]:
    """The same scenario with the ext4 on the kernel's nbd driver attached to the volume's
    NBD export, not on a loop device on its FUSE file: the same fault, the same checks."""
    def scenario(world: World) -> Outcome:
        world.nbd = True
        return func(world)
    scenario.__doc__ = func.__doc__
    return scenario


@dataclasses.dataclass(frozen=True)
class Scenario:
    name: str
    func: Callable[[World], Outcome]
    faults: str  # the fault, as the table shows it
    about: str  # one sentence for --list and the docs
    layouts: tuple[str, ...]  # run by default
    all_layouts: tuple[str, ...] = tuple(LAYOUTS)  # run with --all
    weight: int = 1  # rough relative run time: the heaviest start first


SCENARIOS = [
    Scenario("flakey-down", sc_flakey_down, "dm-flakey 1s up/1s down on 1 disk, mid-write",
             "one disk goes through dm-flakey down periods (every I/O fails) while files are "
             "written; the pool marks it failed and the volume keeps serving intact data",
             ("mirror-2", "parity-1")),
    Scenario("error-writes", sc_error_writes, "dm-flakey error_writes on 1 disk, mid-write",
             "one disk fails every write (reads still work); the pool marks it failed and "
             "the volume keeps serving intact data", ("mirror-2", "parity-1")),
    Scenario("bad-sectors", sc_bad_sectors, "linear+error: 256 KiB under file data",
             "256 KiB of unreadable sectors (dm linear + error table) right under file data "
             "on one disk; every read is served from redundancy", ("mirror-2", "parity-1")),
    Scenario("zeroed-range", sc_zeroed_range, "linear+zero: 4 MiB under file data",
             "4 MiB of one disk, right under file data, read as zeros and drop writes (dm "
             "linear + zero table, swapped in under the live ext4); files go on being "
             "written, every file reads back right, fsck clean", ("parity-1",)),
    Scenario("tolerance", sc_tolerance, "tolerance-many disks die mid-write",
             "as many disks as the layout tolerates die (dm error target) mid-write; writes "
             "go on, every byte reads back, and the pool mounts again degraded with every "
             "byte there", ("mirror-3", "parity-2")),
    Scenario("power-cut", sc_power_cut, "dm-log-writes on every disk, replay to marks",
             "every disk's writes are recorded with dm-log-writes; consistent marks (all "
             "disks suspended) are taken at a random instant while files are written with "
             "fsync and after a final sync; each disk's log is replayed to the same mark "
             "onto fresh disks; the pool must import and mount, ext4 mount (journal replay) "
             "and fsck clean, and every file fsynced before the mark read back right",
             ("mirror-2", "parity-1"), weight=3),
    Scenario("thin-degraded", sc_thin_degraded, "dm-flakey error_writes, thin volume",
             "a thin volume loses a disk to write errors, then files are written where no "
             "slab is allocated yet: the volume must stay writable", ("mirror-2",)),
    Scenario("drop-writes", sc_drop_writes, "dm-flakey drop_writes on 1 disk",
             "one disk silently drops every write (new files and overwrites); nothing wrong "
             "may ever be read", ("mirror-2",)),
    Scenario("corrupt-writes", sc_corrupt_writes, "dm-flakey corrupt_bio_byte on writes",
             "one disk corrupts a byte of every write it stores; nothing wrong may ever be "
             "read", ("parity-1",)),
    Scenario("nbd-fstrim", sc_nbd_fstrim, "none: kernel nbd + fstrim, thin volume",
             "a thin volume exported with mount --nbd is attached with nbd-client (the "
             "kernel's nbd driver), gets ext4 and files; most are deleted and fstrim run: the "
             "volume's allocation in pool status must drop, the rest read back, fsck clean",
             ("mirror-2",)),
    Scenario("error-writes-nbd", over_nbd(sc_error_writes),
             "dm-flakey error_writes on 1 disk, mid-write; ext4 on kernel nbd",
             "error-writes with the ext4 on the volume's NBD export (mount --nbd, nbd-client "
             "in the guest) instead of a loop device: the pool marks the disk failed and the "
             "volume keeps serving intact data", ("mirror-2",)),
    Scenario("power-cut-nbd", over_nbd(sc_power_cut),
             "dm-log-writes on every disk, replay to marks; ext4 on kernel nbd",
             "power-cut with the ext4 on the volume's NBD export, before the cut and after "
             "each replay: every file fsynced (NBD FLUSH) before a mark reads back right, "
             "fsck clean", ("mirror-2",), weight=3),
    Scenario("hang", sc_hang, f"dm-delay 3600 s on 1 disk, --io-timeout {HANG_IO_TIMEOUT}",
             f"one disk stops answering (dm-delay of an hour) under a pool mounted with "
             f"--io-timeout {HANG_IO_TIMEOUT}; writes, fsync and reads must complete within "
             f"{HANG_DEADLINE:.0f} s", ("mirror-2",), weight=2),
    Scenario("replace-rebuild", sc_replace_rebuild, "tolerance-many die, replace, others die",
             "tolerance-many disks die and are replaced with `blockspace disk replace ... "
             "--wait`; then the surviving original disks die too, so every byte must come "
             "from the rebuilt disks", ("mirror-3",), weight=4),
]


# --------------------------------------------------------------------------------------------
# running


@dataclasses.dataclass
class Result:
    name: str
    layout: str
    faults: str
    ok: bool
    checked: int
    seconds: float
    detail: str
    stage: str  # where it stopped: setup, fault or feature (see EXPECTED_FAILURES)
    expected: str | None  # why a failure is expected (None: it must pass)
    expected_stage: str | None = None

    @property
    def expected_failure(self) -> bool:
        return not self.ok and bool(self.expected) and self.stage == self.expected_stage

    @property
    def verdict(self) -> str:
        if self.ok and self.expected:
            return f"pass (unexpected: listed as '{self.expected}')"
        if self.ok:
            return "pass"
        if self.expected_failure:
            return f"expected failure ({self.expected})"
        return "FAIL" + (f" (in {self.stage}, before the step that is expected to fail)"
                         if self.expected else "")

    @property
    def good(self) -> bool:
        return self.ok or self.expected_failure


def run_one(scenario: Scenario, layout: str, scratch_root: Path, tag: str,
            verbose: bool) -> Result:
    scratch = scratch_root / f"{scenario.name}-{layout}"
    scratch.mkdir(parents=True)
    log_path = scratch.parent / f"{scenario.name}-{layout}.log"
    log_file = open(log_path, "w")  # noqa: SIM115
    started = time.monotonic()

    def log(message: str) -> None:
        line = f"[{time.monotonic() - started:6.1f}s] {scenario.name}/{layout}: {message}"
        log_file.write(line + "\n")
        log_file.flush()
        if verbose:
            print(line, file=sys.stderr, flush=True)

    world = World(scratch, tag, layout, log)
    finished = threading.Event()

    def watchdog() -> None:
        if not finished.wait(SCENARIO_TIMEOUT):
            log(f"scenario overran {SCENARIO_TIMEOUT:.0f}s: aborting it")
            world.abort()

    threading.Thread(target=watchdog, daemon=True).start()
    try:
        outcome = scenario.func(world)
    except Exception as error:  # noqa: BLE001
        log(traceback.format_exc())
        outcome = Outcome(False, 0, f"{type(error).__name__}: {str(error)[:200]}")
        dead = world.bs.dead_daemons()
        if dead:
            outcome.detail += f" (the daemon died: {dead[0]})"
    finally:
        finished.set()
        try:
            world.close()
        except Exception:  # noqa: BLE001
            log("teardown: " + traceback.format_exc())
    seconds = time.monotonic() - started
    log(f"outcome ok={outcome.ok} checked={outcome.checked} {outcome.detail}")
    if not outcome.ok:
        _log_daemon_tail(world.daemon_log, log)
    log_file.close()
    expectation = expected_failure(scenario.name, layout)
    result = Result(scenario.name, layout, scenario.faults, outcome.ok, outcome.checked,
                    seconds, outcome.detail, world.stage,
                    expectation[0] if expectation else None,
                    expectation[1] if expectation else None)
    if not result.good and not verbose:
        tail = log_path.read_text(errors="replace").splitlines()[-40:]
        print("\n".join(f"    | {line}" for line in tail), file=sys.stderr, flush=True)
    shutil.rmtree(scratch, ignore_errors=True)
    return result


def _log_daemon_tail(path: Path, log: Callable[[str], None], lines: int = 30) -> None:
    if path.exists():
        tail = path.read_text(errors="replace").splitlines()[-lines:]
        log(f"last lines of {path.name}:\n" + "\n".join(f"    {line}" for line in tail))


def _size(n: int) -> str:
    return f"{n / MIB:.1f} MiB"


COLUMNS = ("scenario", "layout", "faults", "checked", "time", "verdict")


def format_row(r: Result) -> list[str]:
    return [r.name, r.layout, r.faults, _size(r.checked), f"{r.seconds:.0f}s", r.verdict]


def print_table(results: list[Result], out: Any = None) -> None:
    out = out or sys.stdout
    rows = [list(COLUMNS)] + [format_row(r) for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS) - 1)]
    for n, row in enumerate(rows):
        cells = [cell.ljust(widths[i]) for i, cell in enumerate(row[:-1])] + [row[-1]]
        print("  ".join(cells).rstrip(), file=out)
        if n == 0:
            print("  ".join("-" * w for w in widths) + "  " + "-" * 7, file=out)
    for r in results:
        if r.detail and not r.ok:
            print(f"  {r.name}/{r.layout}: {r.detail}", file=out)


def select_scenarios(only: list[str], run_all: bool) -> list[tuple[Scenario, str]]:
    chosen = []
    for scenario in SCENARIOS:
        layouts = scenario.all_layouts if run_all else scenario.layouts
        for layout in layouts:
            key = f"{scenario.name}/{layout}"
            if only and not any(o == scenario.name or o == key for o in only):
                continue
            chosen.append((scenario, layout))
    if only and not chosen:
        names = ", ".join(s.name for s in SCENARIOS)
        raise SystemExit(f"vmlab: no scenario matches {only} (scenarios: {names}; "
                         "NAME or NAME/LAYOUT)")
    return chosen


def check_environment() -> list[str]:
    problems = []
    if os.geteuid() != 0:
        problems.append("must run as root (loop devices, device-mapper, mounts)")
    for tool in ("dmsetup", "losetup", "mkfs.ext4", "e2fsck", "mount", "umount"):
        if shutil.which(tool) is None:
            problems.append(f"{tool} not found")
    missing = dmtools.modprobe("loop", "fuse", "dm-mod", "dm-flakey", "dm-delay",
                               "dm-log-writes", "dm-zero")
    if missing:
        problems.append(f"kernel modules missing: {' '.join(missing)}")
    if not os.path.exists("/dev/mapper/control"):
        problems.append("no /dev/mapper/control: this kernel has no device-mapper "
                        "(use `tools/vmlab scenarios`, which boots a VM that has it)")
    if not os.path.exists("/dev/fuse"):
        problems.append("/dev/fuse missing")
    return problems


def run_all(chosen: list[tuple[Scenario, str]], scratch: Path, jobs: int,
            verbose: bool) -> list[Result]:
    """Run the scenarios, `jobs` at a time, longest first; print each result as it comes."""
    results: dict[int, Result] = {}
    total = len(chosen)

    def show(index: int, result: Result) -> None:
        results[index] = result
        print(f"[{len(results)}/{total}] " + "  ".join(format_row(result)), flush=True)

    order = sorted(range(total), key=lambda i: -chosen[i][0].weight)
    if jobs <= 1 or total <= 1:
        for index in order:
            scenario, layout = chosen[index]
            show(index, run_one(scenario, layout, scratch, f"{index:02d}", verbose))
        return [results[i] for i in sorted(results)]
    # Forked workers (blockspace is imported already): each takes the next scenario from
    # its command pipe and answers with the result as a JSON line.
    workers: dict[int, tuple[int, int]] = {}  # result fd -> (pid, command fd)
    for _ in range(min(jobs, total)):
        cmd_read, cmd_write = os.pipe()
        res_read, res_write = os.pipe()
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                os.close(cmd_write)
                os.close(res_read)
                for other_res, (_, other_cmd) in workers.items():
                    os.close(other_res)
                    os.close(other_cmd)
                with os.fdopen(cmd_read) as commands, os.fdopen(res_write, "w") as answers:
                    for line in commands:
                        if line.strip() == "quit":
                            break
                        index = int(line)
                        scenario, layout = chosen[index]
                        result = run_one(scenario, layout, scratch, f"{index:02d}", verbose)
                        answers.write(json.dumps({"index": index,
                                                  **dataclasses.asdict(result)}) + "\n")
                        answers.flush()
            except BaseException:  # noqa: BLE001
                traceback.print_exc()
                code = 1
            finally:
                os._exit(code)
        os.close(cmd_read)
        os.close(res_write)
        workers[res_read] = (pid, cmd_write)
    pending = list(order)

    def dispatch(fd: int) -> None:
        _, cmd = workers[fd]
        os.write(cmd, (f"{pending.pop(0)}\n" if pending else "quit\n").encode())

    for fd in list(workers):
        dispatch(fd)
    buffers = {fd: b"" for fd in workers}
    while workers:
        ready, _, _ = select.select(list(workers), [], [])
        for fd in ready:
            chunk = os.read(fd, 65536)
            if not chunk:
                pid, cmd = workers.pop(fd)
                os.close(fd)
                with contextlib.suppress(OSError):
                    os.close(cmd)
                os.waitpid(pid, 0)
                continue
            buffers[fd] += chunk
            while b"\n" in buffers[fd]:
                line, buffers[fd] = buffers[fd].split(b"\n", 1)
                data = json.loads(line)
                show(data.pop("index"), Result(**data))
                with contextlib.suppress(OSError):
                    dispatch(fd)
    for index, (scenario, layout) in enumerate(chosen):
        if index not in results:
            results[index] = Result(scenario.name, layout, scenario.faults, False, 0, 0.0,
                                    "the worker running it died", "setup", None)
    return [results[i] for i in sorted(results)]


def describe() -> str:
    lines = []
    for s in SCENARIOS:
        lines.append(f"{s.name}  (default: {', '.join(s.layouts)}; --all: "
                     f"{', '.join(s.all_layouts)})")
        lines.append(f"    fault: {s.faults}")
        lines.append(f"    {s.about}")
        xfail = expected_failure(s.name, s.layouts[0])
        if xfail:
            lines.append(f"    expected to fail today: {xfail[0]}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    global POWER_CUTS
    parser = argparse.ArgumentParser(prog="vmlab scenarios --direct",
                                     description="the kernel-fault scenario runner")
    parser.add_argument("--only", action="append", default=[], metavar="NAME[/LAYOUT]",
                        help="run only these scenarios (repeatable, or comma-separated)")
    parser.add_argument("--all", action="store_true",
                        help="every scenario on every layout (mirror-2/3, parity-1/2)")
    parser.add_argument("--jobs", "-j", type=int, default=2,
                        help="scenarios run at once (default 2)")
    parser.add_argument("--cuts", type=int, default=POWER_CUTS, metavar="N",
                        help=f"random power cuts per power-cut scenario, besides the one "
                        f"after the final sync (default {POWER_CUTS})")
    parser.add_argument("--list", action="store_true", help="describe the scenarios")
    parser.add_argument("--in-vm", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--accel-note", default="", help=argparse.SUPPRESS)
    parser.add_argument("--scratch", help="scratch directory (default: a new one in /tmp)")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--verbose", "-v", action="store_true", help="log every step")
    args = parser.parse_args(argv)
    POWER_CUTS = max(0, args.cuts)
    if args.list:
        print(describe())
        return 0
    only = [o for item in args.only for o in item.split(",") if o]
    chosen = select_scenarios(only, args.all)
    t0 = time.monotonic()
    _ensure_blockspace(argv)
    problems = check_environment()
    if problems:
        for problem in problems:
            print(f"vmlab: {problem}", file=sys.stderr)
        return 2
    import blockspace.cli.main  # noqa: F401  (import once, before any fork)
    import blockspace.service.daemon  # noqa: F401

    if args.verbose:
        print(f"vmlab: runner ready in {time.monotonic() - t0:.1f}s (uptime "
              f"{Path('/proc/uptime').read_text().split()[0]}s)", file=sys.stderr)
    where = "in the lab VM" if args.in_vm else "directly on this machine"
    accel = f", {args.accel_note.upper()}" if args.accel_note else ""
    print(f"vmlab: {len(chosen)} scenarios {where} (kernel {os.uname().release}{accel}, "
          f"{args.jobs} at a time)", flush=True)
    scratch = Path(args.scratch) if args.scratch else Path(
        tempfile.mkdtemp(prefix="vmlab-scenarios-"))
    scratch.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    try:
        results = run_all(chosen, scratch, max(1, args.jobs), args.verbose)
    finally:
        if not args.scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    took = time.monotonic() - started
    print()
    print_table(results)
    passed = sum(r.ok for r in results)
    xfail = sum(r.expected_failure for r in results)
    failed = sum(not r.good for r in results)
    print(f"\n{passed} passed, {failed} failed, {xfail} expected failures "
          f"in {took:.0f}s")
    if args.json:
        Path(args.json).write_text(json.dumps([dataclasses.asdict(r) | {"verdict": r.verdict}
                                               for r in results], indent=2))
    return 0 if failed == 0 else 1
