"""A bytearray-backed `Device` for tests and the crash tools (`tools/crashloop`, crashsim).

Test tooling: product code never imports it (tests/unit/test_import_rules.py checks).
"""

from __future__ import annotations

import errno
import os

import trio

from blockspace.disks.devices import Buffer, Device, byte_view
from blockspace.errors import DeviceError


class MemoryDevice(Device):
    """A bytearray-backed device. Fault hooks for tests:

    * `failed = True`: every read/write/flush/zero raises DeviceError (EIO), like a dead disk;
    * `bad_ranges`: (offset, length) pairs; a read overlapping one fails with EIO, like a
      latent sector error (writes still succeed, as a drive would remap);
    * `delay`: seconds each async operation sleeps first (a slow disk);
    * `data`: the backing bytearray, to corrupt bytes behind the device's back.
    """

    def __init__(self, size: int, path: str = "mem") -> None:
        if size < 0:
            raise ValueError("size must be >= 0")
        super().__init__(path, size)
        self.data = bytearray(size)
        self.failed = False
        self.bad_ranges: list[tuple[int, int]] = []
        self.delay = 0.0

    def _fault(self, what: str, offset: int, length: int, *, reading: bool) -> None:
        bad = self.failed or (
            reading and any(offset < b + n and b < offset + length for b, n in self.bad_ranges)
        )
        if bad:
            self._errors += 1
            # The error a FileDevice gives for an EIO from the OS (devices.py, `_os_error`).
            err = DeviceError(f"{self.path}: {what}: {os.strerror(errno.EIO)}")
            err.os_errno = errno.EIO  # type: ignore[attr-defined]
            raise err

    async def _pause(self) -> None:
        if self.delay > 0:
            await trio.sleep(self.delay)
        else:
            await trio.lowlevel.checkpoint()

    def read_sync(self, offset: int, length: int) -> bytes:
        what = f"read at {offset}"
        self._check(what, offset, length)
        self._fault(what, offset, length, reading=True)
        self._reads += 1
        self._bytes_read += length
        return bytes(memoryview(self.data)[offset : offset + length])

    def write_sync(self, offset: int, data: Buffer) -> None:
        what = f"write at {offset}"
        view = byte_view(data)
        self._check(what, offset, view.nbytes)
        self._fault(what, offset, view.nbytes, reading=False)
        self.data[offset : offset + view.nbytes] = view
        self._writes += 1
        self._bytes_written += view.nbytes

    def flush_sync(self) -> None:
        self._check("flush", 0, 0)
        self._fault("flush", 0, 0, reading=False)
        self._flushes += 1

    def zero_sync(self, offset: int, length: int) -> None:
        what = f"zero at {offset}"
        self._check(what, offset, length)
        self._fault(what, offset, length, reading=False)
        self.data[offset : offset + length] = bytes(length)

    async def read(self, offset: int, length: int) -> bytes:
        await self._pause()
        return self.read_sync(offset, length)

    async def write(self, offset: int, data: Buffer) -> None:
        await self._pause()
        self.write_sync(offset, data)

    async def flush(self) -> None:
        await self._pause()
        self.flush_sync()

    async def zero(self, offset: int, length: int) -> None:
        await self._pause()
        self.zero_sync(offset, length)

    def close(self) -> None:
        self._closed = True
