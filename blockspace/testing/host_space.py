"""Sparse image files on a host file system that can fill up, in memory: for the tests of
a full host (README, "Disks and failures").

`HostFileSystem` is the host: a capacity in bytes shared by every `SparseImage` on it. An
image allocates a 4 KiB page the first time a write touches it; a write that needs a page
the host cannot give writes what fits first and then fails, as pwrite does on a full file
system (a short write, then ENOSPC on the rest). Zeroing punches holes: whole pages it
covers are given back. Overwrites of allocated pages never need room.

Test tooling: product code never imports it (tests/unit/test_import_rules.py checks).
"""

from __future__ import annotations

import errno
import os

from blockspace.disks.devices import Buffer, byte_view
from blockspace.errors import HostSpaceError
from blockspace.testing.memory_device import MemoryDevice

PAGE = 4096


class HostFileSystem:
    """`capacity` bytes of room for the pages of the images on it."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used = 0

    @property
    def free(self) -> int:
        return max(0, self.capacity - self.used)


class SparseImage(MemoryDevice):
    """A sparse image of `size` bytes on `host`: it uses host room only for pages written."""

    def __init__(self, host: HostFileSystem, size: int, path: str = "sparse",
                 *, code: int = errno.ENOSPC) -> None:
        super().__init__(size, path)
        self.host = host
        self.code = code  # ENOSPC, or EDQUOT for a quota
        self.pages: set[int] = set()

    def host_room(self) -> int | None:
        return self.host.free

    def write_sync(self, offset: int, data: Buffer) -> None:
        what = f"write at {offset}"
        view = byte_view(data)
        self._check(what, offset, view.nbytes)
        self._fault(what, offset, view.nbytes, reading=False)
        end = offset + view.nbytes
        fits = end
        for page in range(offset // PAGE, -(-end // PAGE)):
            if page in self.pages:
                continue
            if self.host.used + PAGE > self.host.capacity:
                fits = max(offset, page * PAGE)
                break
            self.pages.add(page)
            self.host.used += PAGE
        self.data[offset:fits] = view[: fits - offset]  # what fitted is written
        if fits < end:
            self._errors += 1
            # The error a FileDevice gives for it (devices.py, `_os_error`).
            error = HostSpaceError(f"{self.path}: {what}: {os.strerror(self.code)}")
            error.os_errno = self.code  # type: ignore[attr-defined]
            raise error
        self._writes += 1
        self._bytes_written += view.nbytes

    def zero_sync(self, offset: int, length: int) -> None:
        super().zero_sync(offset, length)
        first, end = -(-offset // PAGE), (offset + length) // PAGE
        for page in range(first, end):
            if page in self.pages:
                self.pages.discard(page)
                self.host.used -= PAGE
