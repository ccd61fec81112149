"""One writer per disk on this host, whatever path reaches it: an flock on a file named by
the disk's UUID (from its label), not on the path that was opened. The per-path flock of
blockspace/disks/devices.py does not see the same image through a loop device, a symlink to
another name or /dev/disk/by-*; this does.

The lock file holds the holder's pid and the path it opened, so a refusal names both; the
kernel (/proc/locks) confirms the pid. Lock files are never removed: unlinking one that
another process is about to lock would let two processes hold "the" lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os

from blockspace.disks.locks import describe_holders, lock_holders
from blockspace.errors import BlockspaceError

LOCK_DIR_ENV = "BLOCKSPACE_LOCK_DIR"
DEFAULT_LOCK_DIR = "/run/blockspace/locks"


def lock_dir() -> str:
    """Where the host locks live: $BLOCKSPACE_LOCK_DIR (tests), else /run/blockspace/locks.
    It must be the same for every process on the host that may open the disks."""
    return os.environ.get(LOCK_DIR_ENV) or DEFAULT_LOCK_DIR


class DiskInUse(BlockspaceError):
    """Another process of this host writes the disk (through whatever path)."""


class HostLock:
    """An exclusive lock on one disk UUID for this process, until `release`."""

    def __init__(self, fd: int, path: str) -> None:
        self._fd = fd
        self.path = path

    @classmethod
    def acquire(cls, disk_uuid: str, *, what: str, device_path: str,
                directory: str | None = None) -> HostLock:
        """Lock `disk_uuid`; DiskInUse naming the holder when another process has it.
        `what` names the disk in that message ("pool 'tank' disk 1")."""
        directory = directory or lock_dir()
        try:
            os.makedirs(directory, mode=0o700, exist_ok=True)
            lock_path = os.path.join(directory, f"{disk_uuid}.lock")
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        except OSError as error:
            raise BlockspaceError(f"{what}: cannot create its lock in {directory}: "
                                  f"{error.strerror or error}") from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise DiskInUse(_in_use(fd, what, disk_uuid)) from None
            record = json.dumps({"pid": os.getpid(), "path": device_path}).encode()
            os.ftruncate(fd, 0)
            os.pwrite(fd, record + b"\n", 0)
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, lock_path)

    def release(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)  # closing the last descriptor drops the flock

    @property
    def held(self) -> bool:
        return self._fd >= 0


def _in_use(fd: int, what: str, disk_uuid: str) -> str:
    """The one line for a disk another process holds: its pid (the kernel's word, else the
    lock file's) and the path it opened the disk by."""
    recorded: dict[str, object] = {}
    with contextlib.suppress(OSError, ValueError):
        data = json.loads(os.pread(fd, 4096, 0).decode("utf-8", "replace") or "{}")
        if isinstance(data, dict):
            recorded = data
    pids = lock_holders(fd)
    if not pids and isinstance(recorded.get("pid"), int):
        pids = [int(recorded["pid"])]  # type: ignore[call-overload]
    holder = describe_holders(pids) or "another process"
    if os.getpid() in pids:
        holder = f"this process (pid {os.getpid()})"
    path = recorded.get("path")
    through = f" through {str(path)[:200]}" if isinstance(path, str) else ""
    return (f"{what} (disk uuid {disk_uuid}) is in use by another writer on this host: "
            f"{holder} holds it{through}")
