"""Everything that touches the machine: commands, loop devices, mounts, daemons, /proc,
packages, and the sweep that leaves nothing behind.

Rule of the sweep: a mount, loop device or process belongs to the harness when it lives
under (mounts), is backed by a file under (loops) or names on its command line (processes)
one of the harness's scratch run directories. Nothing else is ever touched.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

VERBOSE = False


def log(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def debug(message: str) -> None:
    if VERBOSE:
        log(message)


class CommandError(RuntimeError):
    pass


def run(
    command: Sequence[str],
    *,
    timeout: float | None = 120,
    check: bool = True,
    input_bytes: bytes | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a command to completion in its own session (a Ctrl-C reaches the harness only,
    which then kills it); output captured. CommandError with stderr's tail if it fails."""
    debug("$ " + " ".join(command))
    with subprocess.Popen(
        list(command),
        stdin=subprocess.PIPE if input_bytes is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
        env=env,
    ) as process:
        try:
            out, err = process.communicate(input_bytes, timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()
            raise CommandError(
                f"{command[0]} timed out after {timeout}s: {' '.join(command)}"
            ) from None
        except BaseException:
            process.kill()
            process.wait()
            raise
    result = subprocess.CompletedProcess(
        list(command), process.returncode, out.decode(errors="replace"),
        err.decode(errors="replace"),
    )
    if check and result.returncode != 0:
        tail = (result.stderr.strip() or result.stdout.strip())[-800:]
        raise CommandError(f"{' '.join(command[:4])}... exited {result.returncode}: {tail}")
    return result


# ---- signals ---------------------------------------------------------------------------

_protected = False


def _on_signal(signum: int, frame: object) -> None:
    if _protected:
        log(f"signal {signum} received while cleaning up: finishing the clean-up first")
        return
    raise KeyboardInterrupt(f"signal {signum}")


def install_signal_handlers() -> None:
    """SIGINT, SIGTERM and SIGHUP all unwind through the clean-up path."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)


@contextlib.contextmanager
def protected() -> Iterator[None]:
    """Signals do not interrupt what runs inside (clean-up)."""
    global _protected
    previous = _protected
    _protected = True
    try:
        yield
    finally:
        _protected = previous


class Cleanup:
    """A LIFO stack of undo actions. Every action runs even if another fails or a signal
    arrives; failures are logged, never raised."""

    def __init__(self) -> None:
        self._actions: list[tuple[str, Callable[[], object]]] = []

    def push(self, description: str, action: Callable[[], object]) -> None:
        self._actions.append((description, action))

    def unwind(self) -> list[str]:
        failures = []
        with protected():
            while self._actions:
                description, action = self._actions.pop()
                debug(f"clean-up: {description}")
                try:
                    action()
                except Exception as error:  # noqa: BLE001 - keep unwinding
                    failures.append(f"{description}: {error}")
                    log(f"clean-up: {description} failed: {error}")
        return failures

    def __enter__(self) -> Cleanup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.unwind()


# ---- mounts ----------------------------------------------------------------------------


@dataclass(frozen=True)
class MountInfo:
    mountpoint: str
    fstype: str
    device: str  # major:minor
    source: str


def _unescape(text: str) -> str:
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\" and i + 3 < len(text) and set(text[i + 1 : i + 4]) <= set("01234567"):
            out.append(chr(int(text[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def parse_mountinfo(text: str) -> list[MountInfo]:
    mounts = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields = left.split()
        rest = right.split()
        if len(fields) < 5 or len(rest) < 2:
            continue
        mounts.append(MountInfo(_unescape(fields[4]), rest[0], fields[2], _unescape(rest[1])))
    return mounts


def mounts() -> list[MountInfo]:
    with open("/proc/self/mountinfo") as f:
        return parse_mountinfo(f.read())


def is_under(path: str, root: str) -> bool:
    root = root.rstrip("/")
    return path == root or path.startswith(root + "/")


def mounts_under(root: str) -> list[MountInfo]:
    """Mounts at or under root, deepest first. Never stats the paths (a dead FUSE daemon
    would answer ENOTCONN, a hung one would hang us)."""
    found = [m for m in mounts() if is_under(m.mountpoint, root)]
    return sorted(found, key=lambda m: len(m.mountpoint), reverse=True)


def is_mounted(path: str) -> bool:
    return any(m.mountpoint == path for m in mounts())


def wait_mounted(path: str, timeout: float, process: subprocess.Popen[bytes] | None = None,
                 log_file: str | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not is_mounted(path):
        if process is not None and process.poll() is not None:
            raise CommandError(
                f"the daemon exited ({process.returncode}) before mounting {path}"
                + log_tail(log_file)
            )
        if time.monotonic() > deadline:
            raise CommandError(f"{path} not mounted after {timeout}s" + log_tail(log_file))
        time.sleep(0.05)


def fuse_abort(mount: MountInfo) -> bool:
    """Abort a FUSE connection (unsticks requests of a dead or hung daemon)."""
    if not mount.fstype.startswith("fuse"):
        return False
    minor = mount.device.split(":")[-1]
    abort = f"/sys/fs/fuse/connections/{minor}/abort"
    try:
        with open(abort, "w") as f:
            f.write("1")
        return True
    except OSError:
        return False


def unmount(path: str, tries: int = 8) -> None:
    """umount, a few times over ~10 s (in-flight AIO of a killed fio keeps a mount busy for
    a moment); then abort a FUSE connection and detach lazily."""
    for attempt in range(tries):
        if not is_mounted(path):
            return
        result = run(["umount", path], check=False, timeout=60)
        if result.returncode == 0 and not is_mounted(path):
            return
        time.sleep(0.3 * (attempt + 1))
    for mount in mounts():
        if mount.mountpoint == path:
            if fuse_abort(mount):
                log(f"aborted the FUSE connection of {path}")
    if is_mounted(path):
        run(["umount", "-l", path], check=False, timeout=60)
        log(f"{path} was busy: detached lazily")


# ---- loop devices ----------------------------------------------------------------------


def loop_backing(dev: str) -> str | None:
    name = os.path.basename(dev)
    try:
        with open(f"/sys/block/{name}/loop/backing_file") as f:
            return f.read().strip().removesuffix(" (deleted)")
    except OSError:
        return None


def loop_dio(dev: str) -> bool | None:
    try:
        with open(f"/sys/block/{os.path.basename(dev)}/loop/dio") as f:
            return f.read().strip() == "1"
    except OSError:
        return None


def loops_backed_under(root: str) -> list[str]:
    out = []
    for entry in sorted(Path("/sys/block").glob("loop*")):
        dev = f"/dev/{entry.name}"
        backing = loop_backing(dev)
        if backing and is_under(backing, root):
            out.append(dev)
    return out


def loop_attach(path: str) -> tuple[str, bool | None]:
    """`losetup --direct-io=on` on path; returns the device and whether direct I/O took."""
    dev = run(["losetup", "-f", "--show", "--direct-io=on", path]).stdout.strip()
    if not dev.startswith("/dev/loop"):
        raise CommandError(f"losetup printed {dev!r}")
    return dev, loop_dio(dev)


def loop_detach(dev: str, backing_under: str, timeout: float = 20) -> None:
    """Detach dev if (and only if) it is still backed by a file under backing_under; wait
    until the kernel has let go of the file."""
    backing = loop_backing(dev)
    if backing is None or not is_under(backing, backing_under):
        return
    deadline = time.monotonic() + timeout
    while True:
        run(["losetup", "-d", dev], check=False, timeout=60)
        backing = loop_backing(dev)
        if backing is None or not is_under(backing, backing_under):
            return
        if time.monotonic() > deadline:
            raise CommandError(f"{dev} still attached to {backing} after {timeout}s")
        time.sleep(0.2)


def btrfs_forget(devs: Sequence[str]) -> None:
    if shutil.which("btrfs"):
        for dev in devs:
            run(["btrfs", "device", "scan", "--forget", dev], check=False, timeout=30)


# ---- processes -------------------------------------------------------------------------


class Daemon:
    """A background process in its own session, output to a log file."""

    def __init__(self, command: Sequence[str], log_file: str, name: str) -> None:
        self.name = name
        self.log_file = log_file
        self.command = list(command)
        debug("$ " + " ".join(self.command) + " &")
        with open(log_file, "ab") as out:
            self.process: subprocess.Popen[bytes] = subprocess.Popen(
                self.command, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout: float = 30) -> None:
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                log(f"{self.name} (pid {self.pid}) ignored SIGTERM for {timeout}s: SIGKILL")
                self.process.kill()
                self.process.wait(timeout=30)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is dead for our purposes
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def stop_pid(pid: int, timeout: float = 30) -> None:
    if not pid_alive(pid):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if pid_alive(pid):
        log(f"pid {pid} ignored SIGTERM for {timeout}s: SIGKILL")
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def processes_referencing(root: str) -> list[int]:
    """Pids (not ours) whose command line names a path under root."""
    found = []
    me = os.getpid()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        for arg in args:
            text = arg.decode(errors="replace")
            if " " in text:  # a shell command line mentioning the path is not a daemon
                continue
            if is_under(text, root) or f"={root}/" in text or f",{root}/" in text:
                found.append(int(entry.name))
                break
    return found


def process_start_ticks(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rpartition(")")[2].split()[19])
    except (OSError, ValueError, IndexError):
        return None


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def proc_memory(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM (KiB) and thread count of pid; {} if it is gone."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM", "Threads"):
                    out[key] = int(value.split()[0])
    except OSError:
        return {}
    return out


def proc_cpu_seconds(pid: int) -> float | None:
    """utime + stime of the whole process (all threads)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    except (OSError, ValueError, IndexError):
        return None


def loadavg() -> float | None:
    try:
        with open("/proc/loadavg") as f:
            return float(f.read().split()[0])
    except (OSError, ValueError):
        return None


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3")


def log_tail(path: str | None, lines: int = 15) -> str:
    if not path:
        return ""
    try:
        with open(path, errors="replace") as f:
            tail = f.readlines()[-lines:]
    except OSError:
        return ""
    if not tail:
        return ""
    return f"\n--- last lines of {path} ---\n" + "".join(tail).rstrip()


# ---- the sweep -------------------------------------------------------------------------


def sweep(root: str) -> list[str]:
    """Undo everything of the harness under root: filesystems, loop devices, daemons, FUSE
    mounts, files. Returns what it had to do (empty when there was nothing)."""
    done: list[str] = []
    with protected():
        # 1. filesystems on loop devices (ext4 of the mkfs trial, btrfs), deepest first
        for mount in mounts_under(root):
            if not mount.fstype.startswith("fuse"):
                unmount(mount.mountpoint)
                done.append(f"unmounted {mount.mountpoint}")
        # 2. loop devices over files inside FUSE mounts (volumes, exports)
        fuse_roots = [m.mountpoint for m in mounts_under(root) if m.fstype.startswith("fuse")]
        for dev in loops_backed_under(root):
            backing = loop_backing(dev) or ""
            if any(is_under(backing, r) for r in fuse_roots):
                loop_detach(dev, root)
                done.append(f"detached {dev}")
        # 3. daemons (they unmount their FUSE mounts on SIGTERM)
        for pid in processes_referencing(root):
            stop_pid(pid)
            done.append(f"stopped pid {pid}")
        # 4. whatever FUSE mount is left
        for mount in mounts_under(root):
            unmount(mount.mountpoint)
            done.append(f"unmounted {mount.mountpoint}")
        # 5. remaining loop devices (btrfs members, raw images)
        left = loops_backed_under(root)
        btrfs_forget(left)
        for dev in left:
            loop_detach(dev, root)
            done.append(f"detached {dev}")
        # 6. files, never across a mount that is still there
        if mounts_under(root):
            log(f"still mounted under {root}; leaving its files")
        elif os.path.lexists(root):
            shutil.rmtree(root, ignore_errors=True)
    return done


# ---- packages --------------------------------------------------------------------------

# command -> (Debian package, what needs it)
COMMANDS: dict[str, tuple[str, str]] = {
    "fio": ("fio", "every job"),
    "losetup": ("mount", "loop devices"),
    "mkfs.ext4": ("e2fsprogs", "the mkfs trial"),
    "fusermount3": ("fuse3", "FUSE setups"),
    "mkfs.btrfs": ("btrfs-progs", "the btrfs baselines"),
    "btrfs": ("btrfs-progs", "the btrfs baselines"),
    "qemu-storage-daemon": ("qemu-system-common", "the qemu-storage-daemon baselines"),
    "perf": ("linux-perf", "the CPU-by-layer profile of --profile"),
    "qemu-nbd": ("qemu-utils", "the qemu-nbd baseline (--nbd)"),
    "nbdkit": ("nbdkit", "the nbdkit baseline (--nbd)"),
}
# python module -> (pip package, what needs it)
MODULES: dict[str, tuple[str, str]] = {
    "matplotlib": ("matplotlib", "the PNG chart"),
}


def missing_commands(commands: Sequence[str]) -> list[str]:
    return [c for c in commands if shutil.which(c) is None
            and not os.path.exists(f"/usr/sbin/{c}") and not os.path.exists(f"/sbin/{c}")]


def missing_modules(modules: Sequence[str]) -> list[str]:
    import importlib.util

    return [m for m in modules if importlib.util.find_spec(m) is None]


def apt_install(packages: Sequence[str]) -> None:
    packages = sorted(set(packages))
    if not packages:
        return
    if shutil.which("apt-get") is None:
        raise CommandError(f"no apt-get here: install {' '.join(packages)} by hand")
    log(f"installing Debian packages: {' '.join(packages)} (apt-get, may take a minute)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    command = ["apt-get", "install", "-y", "-q", "--no-install-recommends",
               "-o", "DPkg::Lock::Timeout=600", *packages]
    result = run(command, check=False, timeout=1800, env=env)
    if result.returncode != 0:
        log("apt-get install failed; running apt-get update and trying again")
        run(["apt-get", "update", "-q", "-o", "DPkg::Lock::Timeout=600"], timeout=900, env=env)
        run(command, timeout=1800, env=env)


def pip_install(packages: Sequence[str]) -> None:
    if not packages:
        return
    log(f"installing Python packages into {sys.prefix}: {' '.join(packages)} (pip)")
    run([sys.executable, "-m", "pip", "install", "-q", *packages], timeout=1800)


def ensure_tools(commands: Sequence[str], modules: Sequence[str], *, install: bool) -> list[str]:
    """Install what is missing (when allowed); returns what is still missing afterwards."""
    cmds = missing_commands(commands)
    mods = missing_modules(modules)
    if install:
        apt_install([COMMANDS[c][0] for c in cmds if c in COMMANDS])
        pip_install([MODULES[m][0] for m in mods if m in MODULES])
        import importlib

        importlib.invalidate_caches()
        cmds = missing_commands(commands)
        mods = missing_modules(modules)
    return cmds + mods


def py_spy_path() -> str | None:
    candidate = os.path.join(os.path.dirname(sys.executable), "py-spy")
    if os.access(candidate, os.X_OK):
        return candidate
    return shutil.which("py-spy")


def ensure_py_spy(*, install: bool) -> str:
    path = py_spy_path()
    if path is None and install:
        pip_install(["py-spy"])
        path = py_spy_path()
    if path is None:
        raise CommandError("py-spy is not installed (tools/bench --install, or pip install "
                           "py-spy into the venv)")
    return path


def btrfs_available() -> tuple[bool, str]:
    """Is btrfs in this kernel? Tries modprobe when it is not listed yet."""

    def listed() -> bool:
        try:
            with open("/proc/filesystems") as f:
                return any(line.split()[-1] == "btrfs" for line in f if line.strip())
        except OSError:
            return False

    if listed():
        return True, ""
    modprobe = shutil.which("modprobe") or ("/sbin/modprobe" if os.path.exists("/sbin/modprobe")
                                            else None)
    if modprobe is None:
        return False, "btrfs is not in /proc/filesystems and there is no modprobe to load it"
    result = run([modprobe, "btrfs"], check=False, timeout=60)
    if listed():
        return True, ""
    why = (result.stderr.strip() or f"modprobe exited {result.returncode}").splitlines()[-1]
    return False, f"this kernel has no btrfs (modprobe btrfs: {why})"
