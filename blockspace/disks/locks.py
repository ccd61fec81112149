"""Who holds the lock on a disk: the kernel lists every file lock in /proc/locks.

A line reads ``1: FLOCK  ADVISORY  WRITE 1234 fe:00:5678 0 EOF`` (id, kind, mode, access,
pid, major:minor:inode in hex:hex:decimal, range); a waiter's line has ``->`` after the
id. The pid is as this process's pid namespace sees it, 0 when the holder is outside it.
"""

import os

PROC_LOCKS = "/proc/locks"


def lock_holders(fd: int, *, proc_locks: str = PROC_LOCKS) -> list[int]:
    """The pids holding a lock on the file open as `fd`, as far as the kernel tells."""
    st = os.fstat(fd)
    wanted = (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)
    try:
        with open(proc_locks) as handle:
            text = handle.read()
    except OSError:
        return []
    holders: list[int] = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 6 or fields[1] == "->":
            continue
        try:
            pid = int(fields[4])
            major, minor, inode = fields[5].split(":")
            key = (int(major, 16), int(minor, 16), int(inode))
        except ValueError:
            continue
        if key == wanted and pid > 0 and pid not in holders:
            holders.append(pid)
    return holders


def describe_holders(pids: list[int]) -> str:
    """'pid 1234 (python3)', or '' for none."""
    named = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/comm") as handle:
                named.append(f"pid {pid} ({handle.read().strip()})")
        except OSError:
            named.append(f"pid {pid}")
    return ", ".join(named)


def in_use_message(path: str, fd: int) -> str:
    """The one line for a disk whose lock another process holds, naming it when known."""
    message = f"{path} is in use by another process (a mounted pool?)"
    others = [pid for pid in lock_holders(fd) if pid != os.getpid()]
    if others:
        message += f": {describe_holders(others)} holds its lock"
    return message
