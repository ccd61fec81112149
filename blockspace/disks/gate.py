"""A device that runs a hook once before the first write through any device of its gate.

An offline command takes the writer lease when it opens a pool, but writes it to the disks
only when it first writes anything else: a command refused for bad input then leaves the
disks exactly as they were (not a byte, not an mtime, changed). The lease's own writes go
to `inner`, past the gate.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio

from blockspace.disks.devices import Buffer, Device


class WriteGate:
    """Shared by the devices of one pool: `hook` runs once, before the first write."""

    def __init__(self) -> None:
        self.hook: Callable[[], Awaitable[None]] | None = None
        self.opened = False
        self._lock = trio.Lock()

    async def open(self) -> None:
        if self.opened:
            return
        async with self._lock:
            if not self.opened:
                if self.hook is None:
                    raise RuntimeError("a write before the pool was taken for writing")
                await self.hook()
                self.opened = True


class GatedDevice(Device):
    """`inner` behind a WriteGate: reads pass, writes wait for the gate."""

    def __init__(self, inner: Device, gate: WriteGate) -> None:
        super().__init__(inner.path, inner.size)
        self.inner = inner
        self.gate = gate

    async def read(self, offset: int, length: int) -> bytes:
        return await self.inner.read(offset, length)

    async def readinto(self, offset: int, buf: bytearray | memoryview) -> None:
        await self.inner.readinto(offset, buf)

    def read_now(self, offset: int, length: int) -> bytes | None:
        return self.inner.read_now(offset, length)

    def read_now_into(self, offset: int, buffers: list[memoryview]) -> bool:
        return self.inner.read_now_into(offset, buffers)

    async def write(self, offset: int, data: Buffer) -> None:
        await self.gate.open()
        await self.inner.write(offset, data)

    async def write_many(self, pieces: list[tuple[int, Buffer]]) -> None:
        await self.gate.open()
        await self.inner.write_many(pieces)

    async def flush(self) -> None:
        await self.inner.flush()

    async def zero(self, offset: int, length: int) -> None:
        await self.gate.open()
        await self.inner.zero(offset, length)

    def read_sync(self, offset: int, length: int) -> bytes:
        return self.inner.read_sync(offset, length)

    def _check_open(self) -> None:
        if not self.gate.opened:  # nothing in Blockspace writes synchronously while mounted
            raise RuntimeError("a synchronous write before the pool was taken for writing")

    def write_sync(self, offset: int, data: Buffer) -> None:
        self._check_open()
        self.inner.write_sync(offset, data)

    def flush_sync(self) -> None:
        self.inner.flush_sync()

    def zero_sync(self, offset: int, length: int) -> None:
        self._check_open()
        self.inner.zero_sync(offset, length)

    def close(self) -> None:
        self.inner.close()
        self._closed = True

    @property
    def closed(self) -> bool:
        return self.inner.closed
