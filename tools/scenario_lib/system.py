"""The machinery of a trial: commands, the blockspace CLI, and a scratch area that remembers
everything it mounted, attached or started so it can take it all down again, in order, even
after a failure, a timeout or Ctrl-C.

It never touches a mount, loop device or process it did not create: loop devices are
detached only while their backing file is still below the trial's directory, processes are
signalled only by the pids this module started (and only while their command line is still
theirs).
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

TOOLS = Path(__file__).resolve().parents[1]
REPO = TOOLS.parent
TOOL_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin"])
REQUIRED_TOOLS = ("losetup", "mount", "umount", "fusermount3", "mkfs.ext4", "fsck.ext4")
CLI_TIMEOUT = 180.0


class CommandFailed(Exception):
    def __init__(self, message: str, result: subprocess.CompletedProcess[str] | None = None):
        super().__init__(message)
        self.result = result


class Interrupted(BaseException):
    """SIGTERM/SIGHUP: unwind like Ctrl-C so every cleanup runs."""


def tool(name: str) -> str:
    path = shutil.which(name, path=TOOL_PATH)
    if path is None:
        raise CommandFailed(f"{name} is not installed")
    return path


def missing_prerequisites() -> str | None:
    """Why real trials cannot run here, or None when they can."""
    reasons = []
    if os.geteuid() != 0:
        reasons.append("not running as root")
    for device in ("/dev/fuse", "/dev/loop-control"):
        if not os.path.exists(device):
            reasons.append(f"{device} is missing")
    for name in REQUIRED_TOOLS:
        if shutil.which(name, path=TOOL_PATH) is None:
            reasons.append(f"{name} not found")
    if not reasons:
        return None
    return "scenario trials need root, /dev/fuse, loop devices and e2fsprogs: " + ", ".join(
        reasons)


def run(cmd: Sequence[str], *, check: bool = True, timeout: float = CLI_TIMEOUT,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run a command with a deadline. On timeout the command is killed, and if it cannot even
    be reaped (stuck in the kernel on a dead device) it is abandoned rather than waited for."""
    process = subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=env, stdin=subprocess.DEVNULL)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        try:
            process.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        raise CommandFailed(f"timed out after {timeout:.0f}s: {' '.join(cmd)}") from None
    except BaseException:
        process.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.communicate(timeout=10)
        raise
    result = subprocess.CompletedProcess(list(cmd), process.returncode, stdout, stderr)
    if check and result.returncode != 0:
        raise CommandFailed(
            f"exit {result.returncode}: {' '.join(cmd)}: "
            f"{(result.stderr.strip() or result.stdout.strip())[-600:]}", result)
    return result


def mounts() -> dict[str, str]:
    """Mount point -> fs type, from /proc/self/mountinfo (never stat a dead FUSE mount)."""
    found = {}
    with open("/proc/self/mountinfo") as table:
        for line in table:
            fields = line.split()
            separator = fields.index("-")
            path = fields[4].replace("\\040", " ").replace("\\011", "\t").replace("\\134", "\\")
            found[path] = fields[separator + 1]
    return found


def loop_backing_file(device: str) -> str | None:
    try:
        with open(f"/sys/block/{os.path.basename(device)}/loop/backing_file") as handle:
            return handle.read().strip().removesuffix(" (deleted)")
    except (FileNotFoundError, OSError):
        return None


def process_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            state = handle.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError, OSError):
        return False
    return state != "Z"


def cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return handle.read()
    except OSError:
        return b""


def _detached(device: str) -> bool:
    return loop_backing_file(device) is None


def _unmounted(mountpoint: Path) -> bool:
    return str(mountpoint) not in mounts()


def _gone(pid: int) -> bool:
    return not process_alive(pid)


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)


IN_PROCESS = os.environ.get("BLOCKSPACE_SCENARIOS_CLI") != "subprocess"
_cli_lock = threading.Lock()


def _cli_in_process(argv: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    """`blockspace.cli.main.main(argv)` with stdout/stderr captured, in a thread so a command that
    hangs (a daemon that stopped answering) costs a timeout, not the run."""
    from blockspace.cli import main as blockspace_cli

    out, err = io.StringIO(), io.StringIO()
    box: dict[str, Any] = {}

    def target() -> None:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                box["rc"] = blockspace_cli.main(argv)
            except SystemExit as error:
                box["rc"] = error.code if isinstance(error.code, int) else 1
            except BaseException as error:  # reported like a crashed command
                box["rc"] = 1
                err.write(f"{type(error).__name__}: {error}\n")

    with _cli_lock:
        thread = threading.Thread(target=target, name="blockspace-cli", daemon=True)
        thread.start()
        thread.join(timeout)
        if thread.is_alive():
            raise CommandFailed(f"timed out after {timeout:.0f}s: blockspace {' '.join(argv)}")
    return subprocess.CompletedProcess(["blockspace", *argv], int(box.get("rc", 1)),
                                       out.getvalue(), err.getvalue())


class Env:
    """A private scratch directory for one trial: images, state dir, mount points."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.state_dir = root / "state"
        self.images = root / "images"
        self.images.mkdir(parents=True)
        self.fs_mounts: list[Path] = []
        self.volume_loops: list[str] = []
        self.pool_mounts: list[Path] = []
        self.daemons: list[int] = []
        self.host_mounts: list[Path] = []  # tmpfs under the images: unmounted last
        self.children: list[subprocess.Popen[bytes]] = []
        self.commands: list[str] = []  # a transcript, for the repro in a report

    @classmethod
    def create(cls, parent: Path | None, prefix: str) -> Env:
        if parent is not None:
            parent.mkdir(parents=True, exist_ok=True)
        root = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
        root.chmod(0o755)
        return cls(root)

    # ---- the CLI ------------------------------------------------------------------------

    def cli(self, *args: str, check: bool = True,
            timeout: float = CLI_TIMEOUT) -> subprocess.CompletedProcess[str]:
        """Run `blockspace ARGS`. In this process (a fresh interpreter costs seconds on a busy
        machine), except `mount`, which detaches a daemon and so must be a process of its own."""
        self.commands.append("blockspace " + " ".join(args))
        argv = ["--state-dir", str(self.state_dir), *args]
        if "mount" in args[:2] or not IN_PROCESS:
            env = dict(os.environ, BLOCKSPACE_STATE_DIR=str(self.state_dir))
            return run([sys.executable, "-m", "blockspace", *argv], check=check,
                       timeout=timeout, env=env)
        result = _cli_in_process(argv, timeout)
        if check and result.returncode != 0:
            raise CommandFailed(
                f"exit {result.returncode}: blockspace {' '.join(args)}: "
                f"{(result.stderr.strip() or result.stdout.strip())[-600:]}", result)
        return result

    def cli_json(self, *args: str, timeout: float = CLI_TIMEOUT) -> Any:
        return json.loads(self.cli("--json", *args, timeout=timeout).stdout)

    def cli_popen(self, *args: str) -> subprocess.Popen[str]:
        """Start a CLI command without waiting (e.g. two `fault inject` at the same instant)."""
        env = dict(os.environ, BLOCKSPACE_STATE_DIR=str(self.state_dir))
        self.commands.append("blockspace " + " ".join(args) + " &")
        process = subprocess.Popen(
            [sys.executable, "-m", "blockspace", "--state-dir", str(self.state_dir), *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
            stdin=subprocess.DEVNULL)
        self.children.append(process)  # type: ignore[arg-type]
        return process

    def log_tail(self, pool: str, lines: int = 30) -> str:
        try:
            text = (self.state_dir / "log" / f"{pool}.log").read_text(errors="replace")
        except OSError as error:
            return f"(no daemon log: {error})"
        return "\n".join(text.splitlines()[-lines:])

    # ---- resources --------------------------------------------------------------------------

    def make_image(self, name: str, size: int) -> Path:
        path = self.images / name
        with open(path, "xb") as handle:
            handle.truncate(size)
        return path

    def mount_pool(self, pool: str, *flags: str) -> tuple[Path, int]:
        mountpoint = self.root / "pool"
        mountpoint.mkdir(exist_ok=True)
        self.pool_mounts.append(mountpoint)  # before: a half-done mount is cleaned up too
        info = self.cli_json("mount", pool, str(mountpoint), *flags)
        pid = int(info["pid"])
        self.daemons.append(pid)
        if mounts().get(str(mountpoint)) != "fuse.blockspace":
            raise CommandFailed(f"{mountpoint} is not a blockspace mount after `mount`")
        return mountpoint, pid

    def unmount_pool(self, mountpoint: Path, pid: int, *, force: bool = False) -> None:
        self.cli("unmount", str(mountpoint), *(["--force"] if force else []))
        if not wait_until(lambda: not process_alive(pid), 60):
            raise CommandFailed(f"daemon {pid} still running 60 s after unmount")
        if str(mountpoint) in mounts():
            raise CommandFailed(f"{mountpoint} still mounted after unmount")
        self.pool_mounts.remove(mountpoint)

    def attach_loop(self, path: Path) -> str:
        self.commands.append(f"losetup -f --show --direct-io=on {path}")
        device = run([tool("losetup"), "-f", "--show", "--direct-io=on", str(path)]).stdout.strip()
        if not device.startswith("/dev/loop"):
            raise CommandFailed(f"losetup printed {device!r}")
        self.volume_loops.append(device)
        return device

    def detach_loop(self, device: str) -> None:
        self.commands.append(f"losetup -d {device}")
        run([tool("losetup"), "-d", device])
        if not wait_until(lambda: loop_backing_file(device) is None, 30):
            raise CommandFailed(f"{device} still attached 30 s after losetup -d")
        self.volume_loops.remove(device)

    def mkfs(self, device: str) -> None:
        # -b 4096: small file systems default to 1 KiB blocks; real volumes use 4 KiB ones
        self.commands.append(f"mkfs.ext4 -q -F -b 4096 -E nodiscard {device}")
        run([tool("mkfs.ext4"), "-q", "-F", "-b", "4096", "-E", "nodiscard", device])

    def mount_fs(self, device: str, *options: str) -> Path:
        mountpoint = self.root / "fs"
        mountpoint.mkdir(exist_ok=True)
        opts = ",".join(("errors=remount-ro", *options))
        self.commands.append(f"mount -o {opts} {device} {mountpoint}")
        self.fs_mounts.append(mountpoint)
        try:
            run([tool("mount"), "-t", "ext4", "-o", opts, device, str(mountpoint)])
        except CommandFailed:
            self.fs_mounts.remove(mountpoint)
            raise
        return mountpoint

    def umount_fs(self, mountpoint: Path) -> None:
        self.commands.append(f"umount {mountpoint}")
        result = run([tool("umount"), str(mountpoint)], check=False)
        if result.returncode != 0:
            time.sleep(0.5)
            result = run([tool("umount"), str(mountpoint)], check=False)
        if result.returncode != 0:
            run([tool("umount"), "-l", str(mountpoint)])
        self.fs_mounts.remove(mountpoint)

    def mount_images_tmpfs(self, size: int) -> None:
        """A tmpfs of `size` bytes under the images directory (a small host file system
        that can fill up, and be grown with `resize_images_tmpfs`)."""
        self.commands.append(f"mount -t tmpfs -o size={size} tmpfs {self.images}")
        self.host_mounts.append(self.images)
        try:
            run([tool("mount"), "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs",
                 str(self.images)])
        except CommandFailed:
            self.host_mounts.remove(self.images)
            raise

    def resize_images_tmpfs(self, size: int) -> None:
        self.commands.append(f"mount -o remount,size={size} {self.images}")
        run([tool("mount"), "-o", f"remount,size={size}", str(self.images)])

    def spawn(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        process = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, **kwargs)
        self.children.append(process)
        return process

    # ---- teardown ---------------------------------------------------------------------------

    def cleanup(self, *, keep: bool = False) -> list[str]:
        """Take down everything this env created. Returns what could not be done."""
        problems: list[str] = []
        for step in (self._stop_children, self._cleanup_fs, self._cleanup_loops,
                     self._cleanup_pools, self._cleanup_daemons, self._cleanup_host_mounts):
            try:
                step(problems)
            except BaseException as error:  # keep going: the later steps matter even more
                problems.append(f"{step.__name__}: {error!r}")
        leftovers = [m for m in mounts() if m == str(self.root) or m.startswith(f"{self.root}/")]
        if leftovers:
            problems.append(f"still mounted (kept {self.root}): {leftovers}")
        elif not keep:
            shutil.rmtree(self.root, ignore_errors=True)
        return problems

    def _stop_children(self, problems: list[str]) -> None:
        for process in self.children:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    process.terminate()
        for process in self.children:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    problems.append(f"child {process.pid} does not exit (stuck in I/O?)")
        self.children.clear()

    def _cleanup_fs(self, problems: list[str]) -> None:
        for mountpoint in reversed(self.fs_mounts):
            for attempt in range(3):
                if str(mountpoint) not in mounts():
                    break
                if run([tool("umount"), str(mountpoint)], check=False,
                       timeout=60).returncode == 0:
                    break
                time.sleep(0.3 * (attempt + 1))
            if str(mountpoint) in mounts():
                result = run([tool("umount"), "-l", str(mountpoint)], check=False, timeout=60)
                if result.returncode != 0:
                    problems.append(f"umount -l {mountpoint}: {result.stderr.strip()}")
        self.fs_mounts.clear()

    def _cleanup_loops(self, problems: list[str]) -> None:
        for device in reversed(self.volume_loops):
            backing = loop_backing_file(device)
            if backing is None or not backing.startswith(str(self.root) + os.sep):
                continue  # gone already, or the number now belongs to someone else
            result = run([tool("losetup"), "-d", device], check=False, timeout=60)
            if result.returncode != 0:
                problems.append(f"losetup -d {device}: {result.stderr.strip()}")
            elif not wait_until(functools.partial(_detached, device), 15):
                problems.append(f"{device} still attached after losetup -d")
        self.volume_loops.clear()

    def _cleanup_pools(self, problems: list[str]) -> None:
        for mountpoint in reversed(self.pool_mounts):
            if str(mountpoint) not in mounts():
                continue
            result = self.cli("unmount", str(mountpoint), "--force", check=False, timeout=90)
            if result.returncode == 0 and wait_until(
                    functools.partial(_unmounted, mountpoint), 15):
                continue
            result = run([tool("fusermount3"), "-u", "-z", str(mountpoint)], check=False)
            if result.returncode != 0:
                problems.append(f"fusermount3 -u -z {mountpoint}: {result.stderr.strip()}")
        self.pool_mounts.clear()

    def _cleanup_daemons(self, problems: list[str]) -> None:
        for pid in self.daemons:
            if wait_until(functools.partial(_gone, pid), 15):
                continue
            if b"blockspace" not in cmdline(pid):
                continue  # the pid was reused: not ours any more
            os.kill(pid, signal.SIGTERM)
            if wait_until(functools.partial(_gone, pid), 15):
                problems.append(f"daemon {pid} outlived its unmount (SIGTERM ended it)")
                continue
            os.kill(pid, signal.SIGKILL)
            problems.append(f"daemon {pid} needed SIGKILL")
        self.daemons.clear()

    def _cleanup_host_mounts(self, problems: list[str]) -> None:
        # Last: the daemons that held the images open are gone by now.
        for mountpoint in reversed(self.host_mounts):
            if str(mountpoint) not in mounts():
                continue
            result = run([tool("umount"), str(mountpoint)], check=False, timeout=60)
            if result.returncode != 0:
                problems.append(f"umount {mountpoint}: {result.stderr.strip()}")
        self.host_mounts.clear()


@contextlib.contextmanager
def terminate_as_interrupt() -> Any:
    """SIGTERM and SIGHUP raise `Interrupted` in the main thread, so `finally` blocks run."""

    def handler(signum: int, frame: object) -> None:
        raise Interrupted(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
