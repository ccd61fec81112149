"""Loop devices and device-mapper tables for the scenario runner.

Every device made here is remembered by the `Devices` object that made it and torn down by
it, in reverse order; nothing else on the machine is touched (loop devices are created with
`losetup --find --show` over files in the runner's own scratch directory, dm names carry the
runner's prefix).
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

SECTOR = 512

# Without a running udevd (the lab VM has none), dmsetup must make /dev/mapper nodes itself
# instead of waiting for udev to confirm them.
if not os.path.exists("/run/udev/control"):
    os.environ.setdefault("DM_DISABLE_UDEV", "1")


class CommandFailed(Exception):
    pass


def sh(*cmd: str, check: bool = True, timeout: float | None = 120,
       input: str | None = None) -> subprocess.CompletedProcess[str]:
    try:
        result = subprocess.run(list(cmd), text=True, capture_output=True, timeout=timeout,
                                input=input)
    except subprocess.TimeoutExpired as error:
        raise CommandFailed(f"{' '.join(cmd)}: timed out after {timeout}s") from error
    if check and result.returncode != 0:
        message = (result.stderr or result.stdout).strip().splitlines()
        raise CommandFailed(f"{' '.join(cmd)}: exit {result.returncode}: "
                            f"{message[-1] if message else ''}")
    return result


def modprobe(*modules: str) -> list[str]:
    """Load modules; return the ones that could not be loaded."""
    missing = []
    for module in modules:
        if sh("modprobe", module, check=False).returncode != 0:
            missing.append(module)
    return missing


def linear(dev: str, sectors: int) -> str:
    return f"0 {sectors} linear {dev} 0"


def flakey(dev: str, sectors: int, up: int, down: int, *features: str) -> str:
    table = f"0 {sectors} flakey {dev} 0 {up} {down}"
    if features:
        words = " ".join(features).split()
        table += f" {len(words)} {' '.join(words)}"
    return table


def delay(dev: str, sectors: int, ms: int) -> str:
    return f"0 {sectors} delay {dev} 0 {ms}"


def error(sectors: int) -> str:
    return f"0 {sectors} error"


def bad_range(dev: str, sectors: int, start: int, count: int) -> str:
    """linear, except sectors [start, start+count) which fail every read and write."""
    lines = []
    if start > 0:
        lines.append(f"0 {start} linear {dev} 0")
    lines.append(f"{start} {count} error")
    end = start + count
    if end < sectors:
        lines.append(f"{end} {sectors - end} linear {dev} {end}")
    return "\n".join(lines)


def zero_range(dev: str, sectors: int, start: int, count: int) -> str:
    """linear, except sectors [start, start+count), which read as zeros and drop every write
    (dm `zero`: a thin store or a disk returning zeros for what it lost)."""
    lines = []
    if start > 0:
        lines.append(f"0 {start} linear {dev} 0")
    lines.append(f"{start} {count} zero")
    end = start + count
    if end < sectors:
        lines.append(f"{end} {sectors - end} linear {dev} {end}")
    return "\n".join(lines)


def log_writes(dev: str, log_dev: str, sectors: int) -> str:
    return f"0 {sectors} log-writes {dev} {log_dev}"


class Devices:
    """Sparse image files, their loop devices and the dm devices on top."""

    def __init__(self, scratch: Path, prefix: str) -> None:
        self.scratch = scratch
        self.prefix = prefix
        self._loops: list[str] = []
        self._dms: list[str] = []
        self._suspended: set[str] = set()

    # loop devices ----------------------------------------------------------------------

    def image(self, name: str, size: int) -> Path:
        path = self.scratch / name
        with open(path, "wb") as f:
            f.truncate(size)
        return path

    def loop(self, path: Path, *, direct_io: bool = False) -> str:
        cmd = ["losetup", "--find", "--show"]
        if direct_io:
            cmd.append("--direct-io=on")
        dev = sh(*cmd, str(path)).stdout.strip()
        self._loops.append(dev)
        return dev

    def detach_loop(self, dev: str) -> None:
        if dev in self._loops:
            for _ in range(50):
                if sh("losetup", "-d", dev, check=False).returncode == 0:
                    break
                time.sleep(0.1)
            self._loops.remove(dev)

    # dm devices ------------------------------------------------------------------------

    def dm_name(self, name: str) -> str:
        return f"{self.prefix}-{name}"

    def create(self, name: str, table: str) -> str:
        full = self.dm_name(name)
        sh("dmsetup", "create", full, input=table + "\n")
        self._dms.append(full)
        path = f"/dev/mapper/{full}"
        _wait_for(path)
        return path

    def reload(self, name: str, table: str) -> None:
        """Swap the table of a live device (dm suspends it, flushing queued I/O, then
        resumes it with the new table)."""
        full = self.dm_name(name)
        sh("dmsetup", "load", full, input=table + "\n")
        sh("dmsetup", "resume", full)
        self._suspended.discard(full)

    def suspend(self, name: str, *, flush: bool = True) -> None:
        full = self.dm_name(name)
        args = ["dmsetup", "suspend"]
        if not flush:
            args.append("--noflush")
        sh(*args, full, "--nolockfs")
        self._suspended.add(full)

    def resume(self, name: str) -> None:
        full = self.dm_name(name)
        sh("dmsetup", "resume", full)
        self._suspended.discard(full)

    def message(self, name: str, *words: str) -> None:
        sh("dmsetup", "message", self.dm_name(name), "0", *words)

    def remove(self, name: str) -> None:
        full = self.dm_name(name)
        if full not in self._dms:
            return
        if full in self._suspended:
            sh("dmsetup", "resume", full, check=False)
            self._suspended.discard(full)
        for _ in range(50):
            if sh("dmsetup", "remove", full, check=False).returncode == 0:
                break
            time.sleep(0.1)
        else:
            sh("dmsetup", "remove", "--force", full, check=False)
        self._dms.remove(full)

    def close(self) -> None:
        """Tear down everything made here (dm devices first, then loops)."""
        for full in list(reversed(self._dms)):
            self.remove(full.removeprefix(f"{self.prefix}-"))
        for dev in list(reversed(self._loops)):
            self.detach_loop(dev)


def sectors_of(path: str | Path) -> int:
    fd = os.open(str(path), os.O_RDONLY)
    try:
        return os.lseek(fd, 0, os.SEEK_END) // SECTOR
    finally:
        os.close(fd)


def _wait_for(path: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise CommandFailed(f"{path} did not appear")
        time.sleep(0.02)
