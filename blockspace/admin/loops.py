"""Loop devices on volume files and their stable names: what `blockspace attach` and
`detach` do (blockspace/cli/attach.py). /dev/blockspace/POOL/VOLUME is a symlink to the
/dev/loopN that serves the volume, made when it is attached and removed when it is detached
(like the loop device itself, it does not survive a reboot)."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import time
from pathlib import Path

from blockspace.errors import BlockspaceError, InvalidInput

DEV_DIR = Path("/dev/blockspace")
SYS_BLOCK = Path("/sys/block")
TOOL_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin"])


def stable_name(pool: str, volume: str, dev_dir: Path = DEV_DIR) -> Path:
    return dev_dir / pool / volume


def backing_file(device: str) -> str | None:
    """The file behind /dev/loopN, or None when it is not attached (or no loop device)."""
    try:
        text = (SYS_BLOCK / os.path.basename(device) / "loop" / "backing_file").read_text()
    except OSError:
        return None
    return text.strip().removesuffix(" (deleted)")


def loops_of(path: str) -> list[str]:
    """Every loop device attached to `path`, by number."""
    found = []
    for entry in SYS_BLOCK.glob("loop*"):
        if backing_file(entry.name) == path:
            found.append(f"/dev/{entry.name}")
    return sorted(found, key=lambda d: int(d.removeprefix("/dev/loop") or 0))


def _losetup() -> str:
    found = shutil.which("losetup", path=TOOL_PATH)
    if found is None:
        raise BlockspaceError("losetup not found (install util-linux / mount)")
    return found


def attach(path: str, read_only: bool) -> str:
    """`losetup --find --show --direct-io=on PATH`: the new device. Direct I/O, so the loop
    device adds no second page cache and its flushes reach the daemon as fsync."""
    command = [_losetup(), "--find", "--show", "--direct-io=on"]
    if read_only:
        command.append("--read-only")
    result = subprocess.run([*command, path], capture_output=True, text=True, timeout=120,
                            check=False)
    device = result.stdout.strip()
    if result.returncode != 0 or not device.startswith("/dev/loop"):
        message = result.stderr.strip().splitlines()[-1:] or [f"exit {result.returncode}"]
        raise BlockspaceError(f"losetup on {path} failed: {message[0]}")
    return device


def check_not_in_use(device: str) -> None:
    """A loop device with a file system mounted on it (or held by dm, md, swap) cannot be
    detached: losetup -d would only mark it to go when released, and report success."""
    try:
        fd = os.open(device, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC)
    except OSError as error:
        if error.errno == errno.EBUSY:
            raise InvalidInput(f"{device} is in use (a mounted file system?): unmount it "
                               "first") from None
        raise BlockspaceError(f"{device}: {error.strerror}") from None
    os.close(fd)


def detach(device: str, timeout: float = 10.0) -> None:
    result = subprocess.run([_losetup(), "-d", device], capture_output=True, text=True,
                            timeout=120, check=False)
    if result.returncode != 0:
        message = result.stderr.strip().splitlines()[-1:] or [f"exit {result.returncode}"]
        raise BlockspaceError(f"losetup -d {device} failed: {message[0]}")
    deadline = time.monotonic() + timeout
    while backing_file(device) is not None:
        if time.monotonic() > deadline:
            raise BlockspaceError(f"{device} is still attached {timeout:g}s after losetup -d")
        time.sleep(0.05)


def link(pool: str, volume: str, device: str, dev_dir: Path = DEV_DIR) -> Path:
    """Point /dev/blockspace/POOL/VOLUME at `device` (replacing a stale link)."""
    name = stable_name(pool, volume, dev_dir)
    name.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    tmp = name.with_name(f".{volume}.tmp")
    tmp.unlink(missing_ok=True)
    os.symlink(device, tmp)
    os.replace(tmp, name)
    return name


def unlink(pool: str, volume: str, dev_dir: Path = DEV_DIR) -> Path | None:
    """Remove the stable name (and the directories it leaves empty); the name, if it was."""
    name = stable_name(pool, volume, dev_dir)
    if not name.is_symlink():
        return None
    name.unlink()
    for directory in (name.parent, dev_dir):
        try:
            directory.rmdir()
        except OSError:
            break  # not empty: other volumes are attached
    return name


def resolve_name(path: str, dev_dir: Path = DEV_DIR) -> tuple[str, str] | None:
    """(pool, volume) of a stable name /dev/blockspace/POOL/VOLUME, else None."""
    candidate = Path(os.path.abspath(path))
    if candidate.parent.parent == dev_dir:
        return candidate.parent.name, candidate.name
    return None
