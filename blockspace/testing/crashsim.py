"""Power-cut simulation: a disk write cache that loses, reorders and tears unflushed writes.

This is test tooling (it lives in the package, under blockspace/testing/ which product code
never imports, so that `tools/crashloop` and `tests/` can both import it). It proves design
invariant 1: an acknowledged flush is durable, a crash at any instant never loses
acknowledged data, and the pool always opens afterwards.

A real disk acknowledges a write once it is in its volatile cache; only a FLUSH (fdatasync)
makes it durable. On power loss, any subset of the unflushed writes may have reached the
media, in any order, and a write that was being transferred may be *torn*: some of its
sectors landed, the rest did not. `PowerCutDevice` models exactly that, the way
dm-log-writes and CrashMonkey replay a subset of the writes since the last flush:

* `write`/`zero` go into a list of pending writes; reads see them (read-your-writes,
  later writes win where they overlap), like reads served from a disk's cache;
* `flush` applies the pending writes to the inner device, in order, and flushes it;
* `cut(rng, mode)` applies a random subset of the pending writes to the inner device, in a
  random order, tearing some of them at 512-byte sector boundaries, and then turns the
  device off: every later operation raises `DeviceError` (EIO). The inner device now holds
  the post-crash image, ready for `Pool.open`.

Every device of a pool hangs off one `PowerRail`, so a cut hits all disks at the same
instant; the rail counts device operations and can cut on the n-th one.

`crash_pool` builds a pool and a volume on such disks and mounts it the way the daemon
does (`mount_like_daemon`, through the daemon's own `bring_up`: open, note missing disks,
start the write-intent log); its `reboot` cuts the power and mounts again on the inner
disks.

The rest of the module is the workload that the crash tests and `tools/crashloop` share:
a verifiable block pattern (`pattern_block`, `describe_block`), a model of which version of
each block is acknowledged (`BlockModel`, `check_blocks`), and `run_trial`, one seeded
power-cut trial against a layout, returning every violation it saw. Two bare-disk
references (`REFERENCE_LAYOUTS`) calibrate the checks: a disk atomic per 4 KiB must pass
them all, one that tears 512-byte sectors must be caught. docs/crash-testing.md has more.

The inner device is driven through its blocking API (`read_sync`, `write_sync`, ...): for a
`MemoryDevice` that is a memcpy, and it keeps each simulated disk operation atomic with
respect to the trio scheduler, so a cut never lands half-way through bookkeeping. Each
async operation still passes trio checkpoints, so concurrent requests interleave and a
cutter task can strike between any two operations.
"""

from __future__ import annotations

import errno
import hashlib
import itertools
import logging
import os
import random
import struct
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal, Protocol

import trio
import trio.testing
import xxhash

from blockspace.disks.devices import Buffer, Device, byte_view
from blockspace.errors import BlockspaceError, DeviceError
from blockspace.geometry.layouts import LayoutSpec
from blockspace.ondisk.label import compute_geometry
from blockspace.pool.pool import Pool
from blockspace.service.bringup import bring_up, resync_dirty_regions
from blockspace.testing.memory_device import MemoryDevice
from blockspace.volume.volume import Volume

SECTOR = 512
BLOCK = 4096
SECTORS_PER_BLOCK = BLOCK // SECTOR
MiB = 1 << 20

CutMode = Literal["drop_all", "random_subset", "torn"]
CUT_MODES: tuple[CutMode, ...] = ("drop_all", "random_subset", "torn")

# What to do after reopening a pool, before checking it (see settle_after_reopen).
Settle = Callable[[Pool, Volume], Awaitable[None]]


# --------------------------------------------------------------------------------------------
# the power-cut device


@dataclass(frozen=True)
class PowerCutStats:
    """What a `PowerCutDevice` saw. `pending` is what sits in the volatile cache now;
    `pending_at_cut`, `landed`, `dropped` and `torn` describe the cuts so far (a torn write
    is counted in `landed` too: part of it reached the media)."""

    reads: int = 0
    writes: int = 0
    zeros: int = 0
    flushes: int = 0
    pending: int = 0
    cuts: int = 0
    pending_at_cut: int = 0
    landed: int = 0
    dropped: int = 0
    torn: int = 0


@dataclass(frozen=True)
class CutReport:
    """The fate of the unflushed writes of one device at a cut."""

    path: str
    pending: int
    landed: int
    dropped: int
    torn: int


@dataclass
class _Pending:
    offset: int
    length: int
    data: bytes | None  # None: zeros (a `zero` request), kept without allocating them

    def chunk(self, start: int, end: int) -> bytes:
        """Bytes [start, end) of the device range this write covers."""
        if self.data is None:
            return bytes(end - start)
        return self.data[start - self.offset : end - self.offset]


class PowerRail:
    """The power supply shared by the disks of one simulated machine.

    Counts the operations of all its devices (`ops`); `arm(n)` makes the n-th operation
    from now cut the power on every device at once, before that operation takes effect,
    so a cut can be placed at any point of a run, reproducibly. `cut()` does the same on
    demand (e.g. from a task that counts trio checkpoints).
    """

    def __init__(self, rng: random.Random | None = None, mode: CutMode = "torn") -> None:
        self.devices: list[PowerCutDevice] = []
        self.ops = 0
        self.rng = rng if rng is not None else random.Random()
        self.mode: CutMode = mode
        self._cut_at: int | None = None
        self.off = False
        self.cut_op: int | None = None  # value of `ops` when the power went off
        self.reports: list[CutReport] = []

    def attach(self, device: PowerCutDevice) -> None:
        self.devices.append(device)

    def arm(self, after_ops: int, *, rng: random.Random | None = None,
            mode: CutMode | None = None) -> None:
        """Cut the power when the `after_ops`-th device operation from now starts."""
        if after_ops < 1:
            raise ValueError("after_ops must be >= 1")
        self._cut_at = self.ops + after_ops
        if rng is not None:
            self.rng = rng
        if mode is not None:
            self.mode = mode

    def disarm(self) -> None:
        self._cut_at = None

    def tick(self) -> None:
        """Called by each device as an operation starts; cuts when the armed count is hit."""
        self.ops += 1
        if self._cut_at is not None and self.ops >= self._cut_at and not self.off:
            self.cut()

    def cut(self, rng: random.Random | None = None, mode: CutMode | None = None) -> list[CutReport]:
        """Power off every device of the rail in one step (no checkpoint in between)."""
        if self.off:
            return self.reports
        rng = rng if rng is not None else self.rng
        mode = mode if mode is not None else self.mode
        self.off = True
        self.cut_op = self.ops
        self._cut_at = None
        self.reports = [device.cut(rng, mode) for device in self.devices if not device.off]
        return self.reports


def _off_error(path: str, what: str) -> DeviceError:
    error = DeviceError(f"{path}: {what}: power is off (simulated power cut)")
    error.os_errno = errno.EIO  # type: ignore[attr-defined]
    return error


class PowerCutDevice(Device):
    """A disk with a volatile write cache in front of `inner` (see the module docstring).

    `inner` holds what is on the media: it changes only on `flush` (everything pending,
    in order) and on `cut` (a random subset, in random order, possibly torn). Closing this
    device leaves `inner` open unless `close_inner` is set, so a test can reopen the pool on
    the inner devices after a cut.
    """

    def __init__(
        self,
        inner: Device,
        *,
        rail: PowerRail | None = None,
        sector: int = SECTOR,
        close_inner: bool = False,
    ) -> None:
        if sector < 1:
            raise ValueError("sector must be >= 1")
        super().__init__(inner.path, inner.size)
        self.inner = inner
        self.sector = sector
        self.close_inner = close_inner
        self.rail = rail
        self.off = False
        self._pending: list[_Pending] = []
        self._zeros = 0
        self._cuts = self._pending_at_cut = self._landed = self._dropped = self._torn = 0
        if rail is not None:
            rail.attach(self)

    # -- state
    @property
    def pending_writes(self) -> int:
        return len(self._pending)

    def cut_statistics(self) -> PowerCutStats:
        return PowerCutStats(
            reads=self._reads,
            writes=self._writes,
            zeros=self._zeros,
            flushes=self._flushes,
            pending=len(self._pending),
            cuts=self._cuts,
            pending_at_cut=self._pending_at_cut,
            landed=self._landed,
            dropped=self._dropped,
            torn=self._torn,
        )

    # -- the cut
    def cut(self, rng: random.Random, mode: CutMode = "torn") -> CutReport:
        """Lose power: land a random subset of the unflushed writes on `inner` (none for
        "drop_all"; each with probability 1/2 otherwise, applied in random order; with
        "torn", a landed write spanning several sectors keeps only a random prefix of
        them half of the time). Afterwards every operation raises DeviceError."""
        if mode not in CUT_MODES:
            raise ValueError(f"unknown cut mode {mode!r} (choose {', '.join(CUT_MODES)})")
        pending, self._pending = self._pending, []
        self.off = True
        landed: list[tuple[_Pending, int]] = []  # (write, bytes of it that land)
        torn = 0
        if mode != "drop_all":
            for write in pending:
                if rng.random() < 0.5:
                    continue
                keep = write.length
                if mode == "torn" and rng.random() < 0.5:
                    boundaries = self._inner_boundaries(write)
                    if boundaries:
                        keep = rng.choice(boundaries) - write.offset
                        torn += 1
                landed.append((write, keep))
            rng.shuffle(landed)
        for write, keep in landed:
            if write.data is None:
                self.inner.zero_sync(write.offset, keep)
            else:
                self.inner.write_sync(write.offset, write.data[:keep])
        report = CutReport(self.path, len(pending), len(landed), len(pending) - len(landed), torn)
        self._cuts += 1
        self._pending_at_cut += report.pending
        self._landed += report.landed
        self._dropped += report.dropped
        self._torn += torn
        return report

    def _inner_boundaries(self, write: _Pending) -> list[int]:
        """Absolute sector boundaries strictly inside the write: where it can tear."""
        first = (write.offset // self.sector + 1) * self.sector
        return list(range(first, write.offset + write.length, self.sector))

    # -- bookkeeping shared by the sync and async paths
    def _start(self, what: str, offset: int, length: int) -> None:
        self._check(what, offset, length)
        if self.off:
            self._errors += 1
            raise _off_error(self.path, what)
        if self.rail is not None:
            self.rail.tick()
            if self.off:  # this very operation tripped the armed cut
                self._errors += 1
                raise _off_error(self.path, what)

    def _still_on(self, what: str) -> None:
        """After an async operation's last checkpoint: the power may have gone meanwhile, and
        then the request never completes (its effect may or may not have landed)."""
        if self.off:
            self._errors += 1
            raise _off_error(self.path, what)

    def _overlay(self, offset: int, out: bytearray) -> None:
        end = offset + len(out)
        for write in self._pending:
            start = max(offset, write.offset)
            stop = min(end, write.offset + write.length)
            if start < stop:
                out[start - offset : stop - offset] = write.chunk(start, stop)

    def _apply_pending(self) -> None:
        pending, self._pending = self._pending, []
        for write in pending:
            if write.data is None:
                self.inner.zero_sync(write.offset, write.length)
            else:
                self.inner.write_sync(write.offset, write.data)
        self.inner.flush_sync()

    # -- blocking API
    def read_sync(self, offset: int, length: int) -> bytes:
        self._start(f"read at {offset}", offset, length)
        out = bytearray(self.inner.read_sync(offset, length))
        self._overlay(offset, out)
        self._reads += 1
        self._bytes_read += length
        return bytes(out)

    def write_sync(self, offset: int, data: Buffer) -> None:
        view = byte_view(data)
        self._start(f"write at {offset}", offset, view.nbytes)
        if view.nbytes:
            self._pending.append(_Pending(offset, view.nbytes, bytes(view)))
        self._writes += 1
        self._bytes_written += view.nbytes

    def zero_sync(self, offset: int, length: int) -> None:
        self._start(f"zero at {offset}", offset, length)
        if length:
            self._pending.append(_Pending(offset, length, None))
        self._zeros += 1

    def flush_sync(self) -> None:
        self._start("flush", 0, 0)
        self._apply_pending()
        self._flushes += 1

    # -- async API: a checkpoint before (requests interleave, a cutter may strike) and,
    # for state-changing requests, one after (the power may go before the completion)
    async def read(self, offset: int, length: int) -> bytes:
        await trio.lowlevel.checkpoint()
        return self.read_sync(offset, length)

    async def write(self, offset: int, data: Buffer) -> None:
        await trio.lowlevel.checkpoint()
        self.write_sync(offset, data)
        await trio.lowlevel.checkpoint()
        self._still_on(f"write at {offset}")

    async def zero(self, offset: int, length: int) -> None:
        await trio.lowlevel.checkpoint()
        self.zero_sync(offset, length)
        await trio.lowlevel.checkpoint()
        self._still_on(f"zero at {offset}")

    async def flush(self) -> None:
        await trio.lowlevel.checkpoint()
        self.flush_sync()
        await trio.lowlevel.checkpoint()
        self._still_on("flush")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.close_inner:
            self.inner.close()


# --------------------------------------------------------------------------------------------
# a pool on power-cut disks, and its reboot


class BlockTarget(Protocol):
    """What the workload writes to: a `Volume`, or a bare disk for the reference runs."""

    @property
    def size(self) -> int: ...

    async def read(self, offset: int, length: int) -> bytes | bytearray: ...

    async def write(self, offset: int, data: bytes) -> None: ...

    async def flush(self) -> None: ...


async def mount_like_daemon(devices: Sequence[Device], volume_name: str) -> tuple[Pool, Volume]:
    """What `blockspace mount` does with a pool before it serves it, without FUSE: the
    daemon's own bring-up (blockspace/service/bringup.py: open it, record absent disks,
    start the write-intent log, which learns the regions an unclean stop left dirty, and
    build the volumes, which pick those up for resync); returns the volume named."""
    pool, volumes = await bring_up(devices)
    pool.volume(volume_name)  # InvalidInput if the pool has no such volume
    return pool, volumes[volume_name]


@dataclass
class CrashRig:
    """A pool and one volume on `PowerCutDevice`s over in-memory disks, mounted the way
    the daemon mounts it (see `mount_like_daemon`)."""

    spec: LayoutSpec
    inner: list[MemoryDevice]
    devices: list[PowerCutDevice]
    rail: PowerRail
    pool: Pool
    volume: Volume
    volume_name: str
    mounted: Pool | None = None

    @property
    def tolerance(self) -> int:
        return self.spec.tolerance

    @property
    def region_center(self) -> int:
        """The boundary between the volume's first two slabs."""
        return self.volume.slab_data_size

    async def background(self) -> None:
        """The daemon's background work while it serves: the intent log's cleaner."""
        assert self.pool.intent is not None
        await self.pool.intent.run_cleaner()

    async def reboot(
        self,
        rng: random.Random | None = None,
        mode: CutMode | None = None,
        *,
        without: Iterable[int] = (),
    ) -> tuple[Pool, Volume]:
        """Cut the power on every disk at once (if the cut has not happened yet), then mount
        the pool again on the inner disks (all but the indexes in `without`, to model disks
        lost after the crash; the mount records them as missing on the others, as the
        daemon does) and return it with the volume, not yet resynced. Raises whatever
        opening raises: a pool that does not open after a power cut is a failure."""
        self.rail.cut(rng, mode)
        self.pool.close()
        skip = set(without)
        present = [device for index, device in enumerate(self.inner) if index not in skip]
        return await mount_like_daemon(present, self.volume_name)

    async def reopen(self, settle: Settle, without: Iterable[int] = ()) -> BlockTarget:
        """After the cut: mount with every disk (`without` empty), changing the inner disks
        as the mount does (resync, heals). With `without`, mount copies of the disks as they
        are now, minus those: a disk lost after the remount, and nothing else changed."""
        self.rail.cut()
        self.pool.close()
        skip = set(without)
        if skip:
            present: Sequence[Device] = [
                _copy(device) for index, device in enumerate(self.inner) if index not in skip
            ]
        else:
            present = self.inner
        pool, volume = await mount_like_daemon(present, self.volume_name)
        await settle(pool, volume)
        self.mounted = pool
        return volume

    async def clean_stop(self) -> None:
        """Unmount the pool `reopen` mounted the way the daemon stops cleanly (flush, then
        an intent log that holds only what still awaits resync)."""
        if self.mounted is not None:
            await self.mounted.close_intent_log()
            self.mounted = None

    def data_digest(self) -> str:
        """Digest of the data of every extent: labels and metadata hold random UUIDs and
        times, checksum entries carry time-based write sequence numbers."""
        hasher = xxhash.xxh3_128()
        for index, disk in enumerate(self.inner):
            geometry = self.pool.disks[index].geometry
            view = memoryview(disk.data)
            for extent in range(geometry.extent_count):
                start = geometry.extent_offset(extent)
                hasher.update(view[start : start + geometry.slab_size])
        return hasher.hexdigest()


def _copy(device: MemoryDevice) -> MemoryDevice:
    twin = MemoryDevice(device.size, path=device.path)
    twin.data[:] = device.data
    return twin


class DiskTarget:
    """A bare disk as a `BlockTarget`: what the workload sees without any pool in between."""

    def __init__(self, device: Device) -> None:
        self.device = device

    @property
    def size(self) -> int:
        return self.device.size

    async def read(self, offset: int, length: int) -> bytes:
        return await self.device.read(offset, length)

    async def write(self, offset: int, data: bytes) -> None:
        await self.device.write(offset, data)

    async def flush(self) -> None:
        await self.device.flush()


@dataclass
class BareDiskRig:
    """One power-cut disk with no pool on it: the reference that calibrates the checks.

    With `sector=4096` a disk never tears a 4 KiB block, and every check must pass; with
    512-byte sectors torn blocks are expected, and the checks must see them."""

    inner: MemoryDevice
    device: PowerCutDevice
    rail: PowerRail
    volume: DiskTarget
    tolerance: int = 0

    @property
    def region_center(self) -> int:
        return self.inner.size // 2

    async def background(self) -> None:
        return

    async def clean_stop(self) -> None:
        return

    async def reopen(self, settle: Settle, without: Iterable[int] = ()) -> BlockTarget:
        self.rail.cut()
        return DiskTarget(self.inner)

    def data_digest(self) -> str:
        return xxhash.xxh3_128_hexdigest(self.inner.data)


STALE = b"STALE: bytes of a volume deleted long ago. "


def stale_fill(device: MemoryDevice, start: int) -> None:
    """Fill `device` from `start` with recognizable stale data, as on a disk whose extents
    were used before: a new slab must read zeros however the crash fell, so this catches an
    extent mapped by durable metadata before its zeroing was durable."""
    size = len(device.data) - start
    device.data[start:] = (STALE * (size // len(STALE) + 1))[:size]


async def crash_pool(
    spec: LayoutSpec,
    *,
    disks: int,
    disk_size: int = 6 * MiB,
    slab_size: int = MiB,
    meta_slot_size: int = 64 << 10,
    volume_size: int | None = None,
    provisioning: str = "thin",
    rail: PowerRail | None = None,
    stale: bool = True,
    sector: int = SECTOR,
    name: str = "crash",
    volume_name: str = "vol",
) -> CrashRig:
    """Build `disks` MemoryDevices behind PowerCutDevices on one rail, create a pool and a
    volume on them and mount it like the daemon does (with the write-intent log). Creation
    ends flushed (Pool.create and every commit flush), so the rail's counter starts from a
    durable pool."""
    inner = [MemoryDevice(disk_size, path=f"mem{i}") for i in range(disks)]
    if stale:
        data_start = compute_geometry(disk_size, slab_size, meta_slot_size).data_start
        for device in inner:
            stale_fill(device, data_start)
    rail = rail if rail is not None else PowerRail()
    devices = [PowerCutDevice(device, rail=rail, sector=sector) for device in inner]
    pool = await Pool.create(
        name, devices, media=["hdd"] * disks, slab_size=slab_size,
        meta_slot_size=meta_slot_size,
    )
    if volume_size is None:
        volume_size = spec.slab_data_size(slab_size) * 3
    await pool.create_volume(volume_name, volume_size, spec, provisioning)
    await pool.flush()
    # Created offline like `blockspace pool create` + `volume create`; now mounted.
    pool, volume = await mount_like_daemon(devices, volume_name)
    return CrashRig(spec, inner, devices, rail, pool, volume, volume_name)


# --------------------------------------------------------------------------------------------
# the verifiable pattern

_SECTOR_MAGIC = b"BSPCUT01"
_SECTOR_HEAD = struct.Struct("<8sQQII")  # magic, volume block, write seq, sector, reserved
_SECTOR_TAIL = 8  # xxh3_64 of the rest of the sector
_FILLER = SECTOR - _SECTOR_HEAD.size - _SECTOR_TAIL


def pattern_block(block: int, seq: int) -> bytes:
    """The 4 KiB image that write `seq` puts in volume block `block`. Every 512-byte sector
    names its block, its write and its index and carries a checksum, so a read can say
    what it found: a whole version, a torn mix of two, another block's data, or garbage."""
    filler = hashlib.shake_128(_SECTOR_HEAD.pack(_SECTOR_MAGIC, block, seq, 0, 1)).digest(
        _FILLER * SECTORS_PER_BLOCK
    )
    sectors = []
    for index in range(SECTORS_PER_BLOCK):
        body = (_SECTOR_HEAD.pack(_SECTOR_MAGIC, block, seq, index, 0)
                + filler[index * _FILLER : (index + 1) * _FILLER])
        sectors.append(body + xxhash.xxh3_64_digest(body))
    return b"".join(sectors)


def _parse_sector(sector: bytes | bytearray) -> tuple[int, int, int] | str:
    if not any(sector):
        return "zeros"
    if sector.startswith(STALE[:16]) or STALE[:16] in sector:
        return "stale"
    if len(sector) != SECTOR or not sector.startswith(_SECTOR_MAGIC):
        return "garbage"
    body, tail = sector[:-_SECTOR_TAIL], sector[-_SECTOR_TAIL:]
    if xxhash.xxh3_64_digest(body) != tail:
        return "garbage"
    _, block, seq, index, _ = _SECTOR_HEAD.unpack_from(sector)
    return block, seq, index


def describe_block(block: int, data: bytes | bytearray) -> str:
    """A short account of what a 4 KiB block holds, sector by sector, e.g.
    "seq 17 (s0-3) + seq 12 (s4-7)", "zeros", "stale (s0-7)", "block 9 seq 4 (s0-7)"."""
    if len(data) != BLOCK:
        return f"{len(data)} bytes"
    if not any(data):
        return "zeros"
    runs: list[tuple[str, int, int]] = []
    for index in range(SECTORS_PER_BLOCK):
        parsed = _parse_sector(data[index * SECTOR : (index + 1) * SECTOR])
        if isinstance(parsed, str):
            what = parsed
        else:
            owner, seq, sector = parsed
            what = f"seq {seq}" if owner == block else f"block {owner} seq {seq}"
            if sector != index:
                what += f" sector {sector}"
        if runs and runs[-1][0] == what and runs[-1][2] == index - 1:
            runs[-1] = (what, runs[-1][1], index)
        else:
            runs.append((what, index, index))
    return " + ".join(
        f"{what} (s{a})" if a == b else f"{what} (s{a}-{b})" for what, a, b in runs
    )


def pattern_bytes(offset: int, length: int, seq: int) -> bytes:
    """The data write `seq` puts at volume bytes [offset, offset + length)."""
    out = bytearray()
    first, last = offset // BLOCK, (offset + length - 1) // BLOCK
    for block in range(first, last + 1):
        image = pattern_block(block, seq)
        start = max(offset, block * BLOCK) - block * BLOCK
        end = min(offset + length, (block + 1) * BLOCK) - block * BLOCK
        out += image[start:end]
    return bytes(out)


# --------------------------------------------------------------------------------------------
# the model: which versions of each block exist, and which is acknowledged


def _digest(data: bytes | bytearray | memoryview) -> bytes:
    return xxhash.xxh3_128_digest(data)


_ZERO_DIGEST = _digest(bytes(BLOCK))


@dataclass
class Version:
    """One image a block may hold: written by `seq` (0: the initial zeros), completed as
    the `stamp`-th completed write (None: in flight or failed, so it may or may not have
    reached the disks)."""

    seq: int
    digest: bytes
    stamp: int | None
    partial: bool = False


@dataclass(frozen=True)
class Verdict:
    ok: bool
    kind: str  # "acked", "newer", "unacked" (ok) | "lost", "garbage" (not ok)
    detail: str
    seq: int | None = None  # the version found, if any


class BlockModel:
    """Expected contents of the volume blocks [first, first + count) under pattern writes.

    A write completes at a *stamp* (a counter of completed writes); a flush that started
    when the counter was s acknowledges, once it returns, every write with stamp <= s. So
    for each block the acknowledged version is the newest one whose stamp is covered, and
    after a crash the block must read as that version or a newer one (written, in flight or
    failed), never an older one and never anything else.

    Writes to one block never overlap in time (`busy`), so each block's versions are
    totally ordered. A write that covers a block only partly produces an image that
    depends on the block's previous contents; a disk may reorder unflushed writes, so
    such a write is only allowed on a block whose newest version is acknowledged, and the
    block then takes no other write until that one is acknowledged too (`frozen`).
    Otherwise a correct pool could legitimately show a mix the model cannot name.
    """

    def __init__(
        self, first: int, count: int, *, initial: bytes | None = None, first_seq: int = 1
    ) -> None:
        """`initial`: the region's durable contents to start from (default: zeros, a new
        volume); `first_seq`: the seq of the first write (distinct runs on one volume use
        distinct seqs, so a block's versions can never be confused)."""
        if initial is not None and len(initial) != count * BLOCK:
            raise ValueError(f"initial contents must be {count * BLOCK} bytes")
        self.first = first
        self.count = count
        self.versions: dict[int, list[Version]] = {}
        self.images: dict[int, bytes] = {}  # newest image of each touched block
        self.busy: set[int] = set()
        self.frozen: set[int] = set()
        self.blocks_of: dict[int, list[int]] = {}
        self.stamp = 0
        self.ack_stamp = 0
        self._initial = initial
        self._seq = first_seq - 1

    # -- history of one block
    def initial_image(self, block: int) -> bytes:
        if self._initial is None:
            return bytes(BLOCK)
        start = (block - self.first) * BLOCK
        return self._initial[start : start + BLOCK]

    def _initial_version(self, block: int) -> Version:
        if self._initial is None:
            return Version(0, _ZERO_DIGEST, 0)
        return Version(0, _digest(self.initial_image(block)), 0)

    def _history(self, block: int) -> list[Version]:
        history = self.versions.get(block)
        if history is None:
            history = self.versions[block] = [self._initial_version(block)]
        return history

    def image(self, block: int) -> bytes:
        image = self.images.get(block)
        return image if image is not None else self.initial_image(block)

    def may_fail_to_read(self, block: int) -> bool:
        """Whether a read error is tolerable: only for a block that held zeros when last
        acknowledged and has unacknowledged writes (a sector being written when power
        went may be unreadable on a real disk, too). Acknowledged data must read."""
        history = self.versions.get(block)
        return (
            history is not None
            and len(history) > 1
            and self.acked_index(block) == 0
            and history[0].digest == _ZERO_DIGEST
        )

    def acked_index(self, block: int) -> int:
        history = self.versions.get(block)
        if history is None:
            return 0
        for index in range(len(history) - 1, -1, -1):
            stamp = history[index].stamp
            if stamp is not None and stamp <= self.ack_stamp:
                return index
        return 0  # pragma: no cover - version 0 always has stamp 0

    def acked(self, block: int) -> Version:
        return self._history(block)[self.acked_index(block)]

    def newest_acked(self, block: int) -> bool:
        history = self.versions.get(block)
        return history is None or self.acked_index(block) == len(history) - 1

    # -- choosing and recording writes
    def blocks(self) -> range:
        return range(self.first, self.first + self.count)

    def can_write(self, offset: int, length: int) -> bool:
        first, last = offset // BLOCK, (offset + length - 1) // BLOCK
        for block in range(first, last + 1):
            if block in self.busy or block in self.frozen:
                return False
            partial = offset > block * BLOCK or offset + length < (block + 1) * BLOCK
            if partial and not self.newest_acked(block):
                return False
        return True

    def choose(self, rng: random.Random, *, max_blocks: int, unaligned: float,
               within: tuple[int, int] | None = None) -> tuple[int, int] | None:
        """A random writable (offset, length) in the region (or in its blocks
        [within[0], within[1])), or None if none was found."""
        low, high = within if within is not None else (self.first, self.first + self.count)
        for _ in range(16):
            blocks = rng.randint(1, min(max_blocks, high - low))
            start = rng.randrange(low, high - blocks + 1)
            offset, length = start * BLOCK, blocks * BLOCK
            if rng.random() < unaligned:
                head = rng.randrange(0, BLOCK)
                tail = rng.randrange(0, BLOCK)
                offset += head
                length = max(1, length - head - tail)
            if self.can_write(offset, length):
                return offset, length
        return None

    def begin(self, offset: int, length: int) -> tuple[int, bytes]:
        """Record a write about to be issued; returns its seq and its data."""
        self._seq += 1
        seq = self._seq
        data = pattern_bytes(offset, length, seq)
        first, last = offset // BLOCK, (offset + length - 1) // BLOCK
        touched = []
        for block in range(first, last + 1):
            start = max(offset, block * BLOCK)
            end = min(offset + length, (block + 1) * BLOCK)
            image = bytearray(self.image(block))
            image[start - block * BLOCK : end - block * BLOCK] = data[start - offset : end - offset]
            partial = end - start < BLOCK
            self._history(block).append(Version(seq, _digest(image), None, partial))
            self.images[block] = bytes(image)
            self.busy.add(block)
            if partial:
                self.frozen.add(block)
            touched.append(block)
        self.blocks_of[seq] = touched
        return seq, data

    def end(self, seq: int, ok: bool) -> None:
        """The write `seq` returned (ok) or raised. A failed write may have landed in part:
        its blocks stay frozen for good, as nothing certain can be said of them."""
        stamp = None
        if ok:
            self.stamp += 1
            stamp = self.stamp
        for block in self.blocks_of[seq]:
            self.busy.discard(block)
            if ok:
                self._history(block)[-1].stamp = stamp
            else:
                self.frozen.add(block)
                self._history(block)[-1].stamp = None

    def flush_begin(self) -> int:
        return self.stamp

    def flush_end(self, token: int) -> None:
        """The flush that began at `token` returned: everything completed before is acked."""
        if token > self.ack_stamp:
            self.ack_stamp = token
        self.frozen = {
            block
            for block in self.frozen
            if not self.newest_acked(block) or self._history(block)[-1].stamp is None
        }

    # -- verdicts
    def check(self, block: int, data: bytes) -> Verdict:
        history = self.versions.get(block) or [self._initial_version(block)]
        acked = self.acked_index(block)
        found = _digest(data)
        matches = [index for index, version in enumerate(history) if version.digest == found]
        newer = [index for index in matches if index >= acked]
        acked_seq = history[acked].seq
        if newer:
            index = max(newer)
            seq = history[index].seq
            if index == acked:
                return Verdict(True, "acked", f"seq {seq}", seq)
            if acked == 0:
                return Verdict(True, "unacked", f"seq {seq} (nothing acked yet)", seq)
            return Verdict(True, "newer", f"seq {seq}, newer than acked seq {acked_seq}", seq)
        written = ", ".join(str(v.seq) for v in history)
        if matches:
            seq = history[max(matches)].seq
            return Verdict(
                False, "lost",
                f"read seq {seq}, older than the acknowledged seq {acked_seq} "
                f"(versions {written})", seq,
            )
        return Verdict(
            False, "garbage",
            f"read {describe_block(block, data)}; acknowledged seq {acked_seq}, "
            f"versions {written}",
        )

    @property
    def acked_blocks(self) -> int:
        return sum(1 for block in self.versions if self.acked_index(block) > 0)


# --------------------------------------------------------------------------------------------
# one trial


@dataclass(frozen=True)
class CrashLayout:
    """A layout to crash-test: a pool layout on `disks` disks, or (spec None) a bare disk
    whose sectors are `sector` bytes."""

    name: str
    spec: LayoutSpec | None
    disks: int
    sector: int = SECTOR


LAYOUTS: dict[str, CrashLayout] = {
    layout.name: layout
    for layout in (
        CrashLayout("simple", LayoutSpec("simple", 2, interleave=16384), 3),
        CrashLayout("mirror-2", LayoutSpec("mirror", 1, copies=2, interleave=16384), 3),
        CrashLayout("mirror-3", LayoutSpec("mirror", 1, copies=3, interleave=16384), 4),
        CrashLayout("parity-1", LayoutSpec("parity", 3, parity=1, interleave=8192), 4),
        CrashLayout("parity-2", LayoutSpec("parity", 3, parity=2, interleave=8192), 5),
    )
}

# References for the harness itself: a bare disk that is atomic per 4 KiB must pass every
# check, and one that tears 512-byte sectors must be caught in "torn" mode.
REFERENCE_LAYOUTS: dict[str, CrashLayout] = {
    layout.name: layout
    for layout in (
        CrashLayout("disk-4k", None, 1, sector=4096),
        CrashLayout("disk-512", None, 1, sector=512),
    )
}


def find_layout(name: str) -> CrashLayout:
    layout = LAYOUTS.get(name) or REFERENCE_LAYOUTS.get(name)
    if layout is None:
        known = ", ".join([*LAYOUTS, *REFERENCE_LAYOUTS])
        raise KeyError(f"unknown layout {name!r} (known: {known})")
    return layout


@dataclass(frozen=True)
class TrialConfig:
    """Knobs of one trial. The region of blocks written straddles the boundary between the
    volume's first two slabs, so slab allocation (zero, then commit) happens mid-run."""

    region_blocks: int = 160
    max_write_blocks: int = 6
    unaligned: float = 0.2  # share of writes not aligned to 4 KiB
    flush_every: float = 0.12  # chance that a writer's next request is a flush
    read_every: float = 0.08  # chance of a read-back check before the cut
    writers: tuple[int, int] = (2, 6)
    max_ops: int = 600  # the cut falls uniformly in [1, max_ops] device operations
    max_checkpoints: int = 1400  # ... or in [1, max_checkpoints] trio checkpoints
    degraded: bool = True  # also read with disks missing, up to the layout's tolerance:
    loss_sets: int | None = 3  # how many sets of lost disks to try (None: every set)
    stale: bool = True  # extents hold stale data before they are first allocated
    sector: int = 0  # unit of tearing of the pool's disks (0: the layout's, 512 bytes)
    # Virtual time (MockClock) advances by tick_seconds every tick_checkpoints checkpoints
    # of a ticker task, so the daemon's timed background work (the intent log's cleaner)
    # runs during the workload, deterministically. At each tick the writers may move their
    # focus to one half of the region, so the other half goes idle and gets cleaned.
    tick_checkpoints: int = 40
    tick_seconds: float = 0.5
    timeout: float = 900.0  # virtual seconds: a run still busy then is hung


@dataclass(frozen=True)
class Failure:
    layout: str
    seed: int
    mode: str
    phase: str  # "workload", "open", "read", "read without disks [..]"
    kind: str
    block: int | None
    detail: str

    def __str__(self) -> str:
        where = f" block {self.block}" if self.block is not None else ""
        return (f"{self.layout} seed={self.seed} mode={self.mode} [{self.phase}] "
                f"{self.kind}{where}: {self.detail}")


@dataclass
class TrialResult:
    layout: str
    seed: int
    mode: str  # a CutMode, or "sigkill"
    trigger: str
    cut_op: int | None = None
    writes: int = 0
    flushes: int = 0
    acked_blocks: int = 0
    blocks_checked: int = 0
    eio_unacked: int = 0
    reports: list[CutReport] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    image_digest: str = ""  # of the post-crash data areas, to prove reproducibility
    model: BlockModel | None = field(default=None, repr=False)  # kept on request (debugging)
    rig: CrashRig | BareDiskRig | None = field(default=None, repr=False)

    @property
    def survived(self) -> bool:
        return not self.failures

    def summary(self) -> str:
        if self.mode == "sigkill":
            return (f"{self.layout} cycle {self.seed} ({self.trigger}): {self.writes} writes, "
                    f"{self.flushes} fsyncs, {self.acked_blocks} blocks acked; "
                    f"{self.blocks_checked} block reads checked, {len(self.failures)} failures")
        landed = sum(r.landed for r in self.reports)
        pending = sum(r.pending for r in self.reports)
        torn = sum(r.torn for r in self.reports)
        return (f"{self.layout} seed={self.seed} mode={self.mode} trigger={self.trigger} "
                f"cut at op {self.cut_op}: {self.writes} writes, {self.flushes} flushes, "
                f"{self.acked_blocks} blocks acked; {pending} unflushed writes, {landed} "
                f"landed ({torn} torn); {self.blocks_checked} block reads checked, "
                f"{len(self.failures)} failures")


async def settle_after_reopen(pool: Pool, volume: Volume) -> None:
    """The rest of a mount after an unclean stop: the daemon resyncs the regions the intent
    log left dirty in the background (and I/O to a pending region resyncs it first); the
    checks wait for all of it, which reads the same, and see any error it raises."""
    await resync_dirty_regions(volume)


class OrderedEvent:
    """`trio.Event` with first-come, first-woken waiters.

    trio's Event keeps its waiters in a set, so tasks woken together (writers waiting for
    one intent-log commit, readers for one checksum page) are rescheduled in the order of
    their memory addresses, which differs from run to run even in one process. Trials swap
    this in for `trio.Event` (the attribute blockspace looks up) so a seed replays the same
    interleaving. Same API, same cancellation behaviour (a ParkingLot keeps FIFO order)."""

    def __init__(self) -> None:
        self._flag = False
        self._lot = trio.lowlevel.ParkingLot()

    def is_set(self) -> bool:
        return self._flag

    def set(self) -> None:
        if not self._flag:
            self._flag = True
            self._lot.unpark_all()

    async def wait(self) -> None:
        if self._flag:
            await trio.lowlevel.checkpoint()
        else:
            await self._lot.park()

    def statistics(self) -> trio.EventStatistics:
        return trio.EventStatistics(tasks_waiting=self._lot.statistics().tasks_waiting)


def seed_trio_scheduler(seed: int) -> None:
    """trio picks the order of runnable tasks with a module-level Random; seeding it makes
    a trial with the same seed replay the same interleaving. (Private API: if it moves,
    trials stay valid, only less reproducible.)"""
    from trio._core import _run

    generator = getattr(_run, "_r", None)
    if isinstance(generator, random.Random):
        generator.seed(seed)


async def _inline_to_thread(fn: Callable[..., object], *args: object, **_: object) -> object:
    await trio.lowlevel.checkpoint()
    return fn(*args)


@contextmanager
def inline_threads() -> Iterator[None]:
    """Work the pool hands to a worker thread (`trio.to_thread.run_sync`: a checkpoint
    encoded off the trio thread) runs inline for the duration: a thread finishes at a wall
    time of its own, so which task runs next after it differs from run to run, and a seed
    would not replay its trial. (The memory disks of a trial never block.)"""
    original = trio.to_thread.run_sync
    trio.to_thread.run_sync = _inline_to_thread  # type: ignore[assignment]
    try:
        yield
    finally:
        trio.to_thread.run_sync = original  # type: ignore[assignment]


async def build_rig(layout: CrashLayout, rail: PowerRail, config: TrialConfig
                    ) -> CrashRig | BareDiskRig:
    if layout.spec is None:
        inner = MemoryDevice(4 * MiB, path="disk")
        device = PowerCutDevice(inner, rail=rail, sector=layout.sector)
        return BareDiskRig(inner, device, rail, DiskTarget(device))
    return await crash_pool(layout.spec, disks=layout.disks, rail=rail, stale=config.stale,
                            sector=config.sector if config.sector else layout.sector)


def run_trial(
    layout: CrashLayout,
    seed: int,
    *,
    mode: CutMode | None = None,
    config: TrialConfig | None = None,
    settle: Settle = settle_after_reopen,
    keep: bool = False,
) -> TrialResult:
    """One seeded power-cut trial: concurrent pattern writers and flushes on a fresh pool,
    a cut at a random instant, a reopen, and the checks. Deterministic for a given seed."""
    config = config or TrialConfig()
    rng = random.Random(f"{layout.name}:{seed}")
    chosen: CutMode = mode if mode is not None else rng.choice(CUT_MODES)
    trigger = rng.choice(("ops", "checkpoints"))
    result = TrialResult(layout.name, seed, chosen, trigger)
    seed_trio_scheduler(rng.getrandbits(64))
    clock = trio.testing.MockClock(autojump_threshold=0)
    # A cut makes the pool log a warning per failed request; the verdicts below say more.
    library_log = logging.getLogger("blockspace")
    level = library_log.level
    library_log.setLevel(max(level, logging.CRITICAL))
    event_class = trio.Event
    trio.Event = OrderedEvent  # type: ignore[misc,assignment]
    try:
        with inline_threads():
            trio.run(_trial, layout, chosen, rng, config, settle, result, keep, clock=clock)
    except Exception as error:  # noqa: BLE001 - a crash of the trial is a failure, not the end
        record_failure(result, "trial", "crash", None,
                       f"{type(error).__name__}: {error!r}"[:2000])
    finally:
        trio.Event = event_class  # type: ignore[misc]
        library_log.setLevel(level)
    return result


def record_failure(
    result: TrialResult, phase: str, kind: str, block: int | None, detail: str
) -> None:
    result.failures.append(
        Failure(result.layout, result.seed, result.mode, phase, kind, block, detail)
    )


async def _trial(
    layout: CrashLayout,
    mode: CutMode,
    rng: random.Random,
    config: TrialConfig,
    settle: Settle,
    result: TrialResult,
    keep: bool,
) -> None:
    rail = PowerRail(random.Random(rng.getrandbits(64)), mode)
    rig = await build_rig(layout, rail, config)
    volume: BlockTarget = rig.volume
    first = max(0, rig.region_center // BLOCK - config.region_blocks // 2)
    model = BlockModel(first, min(config.region_blocks, volume.size // BLOCK - first))
    if keep:
        result.model, result.rig = model, rig

    writers = rng.randint(*config.writers)
    cut_after = rng.randint(1, config.max_ops if result.trigger == "ops"
                            else config.max_checkpoints)
    if result.trigger == "ops":
        rail.arm(cut_after)
    errors_before_cut: list[str] = []
    middle = model.first + model.count // 2
    focuses = [None, (model.first, middle), (middle, model.first + model.count)]
    focus: list[tuple[int, int] | None] = [None]

    async def ticker(trng: random.Random) -> None:
        clock = trio.lowlevel.current_clock()
        assert isinstance(clock, trio.testing.MockClock)
        while True:
            for _ in range(config.tick_checkpoints):
                await trio.lowlevel.checkpoint()
            clock.jump(config.tick_seconds)
            if trng.random() < 0.15:
                focus[0] = trng.choice(focuses)

    async def writer(wrng: random.Random) -> None:
        while not rail.off:
            roll = wrng.random()
            request = "flush"
            try:
                if roll < config.flush_every:
                    token = model.flush_begin()
                    await volume.flush()
                    # It returned: acknowledged, whatever happened to the power meanwhile.
                    model.flush_end(token)
                    result.flushes += 1
                    if rail.off:
                        result.notes.append(
                            f"a flush returned success after the power cut (op {rail.cut_op}):"
                            f" writes up to stamp {token} count as acknowledged"
                        )
                    continue
                if roll < config.flush_every + config.read_every:
                    request = "read-back"
                    await _read_back(wrng)
                    continue
                chosen = model.choose(wrng, max_blocks=config.max_write_blocks,
                                      unaligned=config.unaligned, within=focus[0])
                if chosen is None:
                    await trio.lowlevel.checkpoint()
                    continue
                offset, length = chosen
                seq, data = model.begin(offset, length)
                request = f"write seq {seq} at {offset}+{length}"
                try:
                    await volume.write(offset, data)
                except BaseException:
                    model.end(seq, False)
                    raise
                model.end(seq, True)
                result.writes += 1
            except Exception as error:  # noqa: BLE001 - every error is judged below
                if not rail.off:
                    errors_before_cut.append(f"{request}: {type(error).__name__}: {error}")
                elif not _is_blockspace_error(error):
                    result.notes.append(
                        f"after the cut, {request} failed with {type(error).__name__} "
                        f"instead of a BlockspaceError: {error!r}"
                    )
                return

    async def _read_back(wrng: random.Random) -> None:
        block = wrng.randrange(model.first, model.first + model.count)
        if block in model.busy:
            return
        expected = model.image(block)
        versions = len(model.versions.get(block, ()))
        data = await volume.read(block * BLOCK, BLOCK)
        unchanged = block not in model.busy and versions == len(model.versions.get(block, ()))
        if unchanged and data != expected and not rail.off:
            errors_before_cut.append(
                f"read-back of block {block} before the cut: {describe_block(block, data)}, "
                f"expected {describe_block(block, expected)}"
            )

    async def cutter(count: int) -> None:
        for _ in range(count):
            if rail.off:
                return
            await trio.lowlevel.checkpoint()
        rail.cut()

    async def background() -> None:
        try:
            await rig.background()
        except BaseException as caught:  # judged like the writers' errors
            # Cancelled when the workload ends; a flush it had in flight may fail too.
            error = _without_cancelled(caught)
            if error is None:
                return
            if not rail.off:
                errors_before_cut.append(
                    f"background task (intent log cleaner): {type(error).__name__}: {error}")
            elif not _is_blockspace_error(error):
                result.notes.append(
                    f"after the cut, the intent log cleaner failed with "
                    f"{type(error).__name__} instead of a BlockspaceError: {error!r}"
                )

    with trio.move_on_after(config.timeout) as scope:
        async with trio.open_nursery() as daemon:
            daemon.start_soon(background)
            daemon.start_soon(ticker, random.Random(rng.getrandbits(64)))
            async with trio.open_nursery() as nursery:
                for _ in range(writers):
                    nursery.start_soon(writer, random.Random(rng.getrandbits(64)))
                if result.trigger == "checkpoints":
                    nursery.start_soon(cutter, cut_after)
            daemon.cancel_scope.cancel()
    if scope.cancelled_caught:
        record_failure(result, "workload", "hang", None,
              f"requests still pending {config.timeout:.0f} virtual seconds in")
    for message in errors_before_cut:
        record_failure(result, "workload", "error", None, message)
    rail.cut()  # no-op if it happened; else the writers all died early (reported above)
    result.cut_op = rail.cut_op
    result.reports = list(rail.reports)
    result.acked_blocks = model.acked_blocks
    result.image_digest = rig.data_digest()

    # reboot with every disk
    try:
        reopened = await rig.reopen(settle)
    except Exception as error:  # noqa: BLE001 - the pool must always open
        record_failure(result, "open", "open", None, f"{type(error).__name__}: {error}")
        return
    healthy = await _verify(reopened, model, result, "read")
    if not config.degraded or rig.tolerance == 0:
        return
    try:
        await rig.clean_stop()
    except Exception as error:  # noqa: BLE001 - a clean stop after the remount must work
        record_failure(result, "stop", "stop", None, f"{type(error).__name__}: {error}")
        return
    # the same after losing disks: redundancy must agree with what was just read
    for lost in loss_sets(layout.disks, rig.tolerance, rng, config.loss_sets):
        phase = f"read without disk{'s' if len(lost) > 1 else ''} {','.join(map(str, lost))}"
        try:
            degraded = await rig.reopen(settle, without=lost)
        except Exception as error:  # noqa: BLE001
            record_failure(result, phase, "open", None, f"{type(error).__name__}: {error}")
            continue
        await _verify(degraded, model, result, phase, healthy=healthy)


def loss_sets(
    disks: int, tolerance: int, rng: random.Random, limit: int | None
) -> list[tuple[int, ...]]:
    """Sets of 1..tolerance disks to lose: all of them, or `limit` random ones including
    one of the largest size (each trial draws its own, so a campaign covers them all)."""
    sets = [
        combo
        for size in range(1, tolerance + 1)
        for combo in itertools.combinations(range(disks), size)
    ]
    if limit is None or limit >= len(sets):
        return sets
    largest = [combo for combo in sets if len(combo) == tolerance]
    first = rng.choice(largest)
    rest = rng.sample([combo for combo in sets if combo != first], limit - 1)
    return sorted([first, *rest], key=lambda combo: (len(combo), combo))


def _without_cancelled(error: BaseException) -> BaseException | None:
    """`error` minus any trio.Cancelled in it (None if nothing else is left)."""
    if isinstance(error, trio.Cancelled):
        return None
    if isinstance(error, BaseExceptionGroup):
        _, rest = error.split(trio.Cancelled)
        return rest
    return error


def _is_blockspace_error(error: BaseException) -> bool:
    if isinstance(error, BaseExceptionGroup):
        return all(_is_blockspace_error(inner) for inner in error.exceptions)
    return isinstance(error, BlockspaceError)


async def read_blocks(volume: BlockTarget, first: int, count: int) -> list[bytes | None]:
    """Each block of [first, first + count), None where the read failed."""
    try:
        data = await volume.read(first * BLOCK, count * BLOCK)
        return [bytes(data[i * BLOCK : (i + 1) * BLOCK]) for i in range(count)]
    except BlockspaceError:
        pass
    blocks: list[bytes | None] = []
    for block in range(first, first + count):
        try:
            blocks.append(bytes(await volume.read(block * BLOCK, BLOCK)))
        except BlockspaceError:
            blocks.append(None)
    return blocks


async def _verify(
    volume: BlockTarget,
    model: BlockModel,
    result: TrialResult,
    phase: str,
    *,
    healthy: dict[int, bytes | None] | None = None,
) -> dict[int, bytes | None]:
    blocks = await read_blocks(volume, model.first, model.count)
    return check_blocks(model, blocks, result, phase, healthy=healthy)


def check_blocks(
    model: BlockModel,
    blocks: Sequence[bytes | None],
    result: TrialResult,
    phase: str,
    *,
    healthy: dict[int, bytes | None] | None = None,
) -> dict[int, bytes | None]:
    """Judge what was read from each block of the model's region (None: a read error) and
    record failures in `result`; returns the reads by block that passed.

    With `healthy` (what passed with every disk present), this is a read with disks
    missing, and each block must also give the same version as then: a copy or parity
    that disagrees would change data already read once a disk is lost. Blocks that
    already failed with every disk present are not judged again."""
    passed: dict[int, bytes | None] = {}
    for block, data in zip(model.blocks(), blocks, strict=True):
        if healthy is not None and block not in healthy:
            continue
        result.blocks_checked += 1
        if data is None:
            if model.may_fail_to_read(block):
                result.eio_unacked += 1
                passed[block] = None
            elif len(model.versions.get(block, ())) > 1:
                record_failure(result, phase, "eio", block,
                               f"read failed; acknowledged seq {model.acked(block).seq}")
            else:
                record_failure(result, phase, "eio", block,
                               "read failed; no write to it in this run")
            continue
        verdict = model.check(block, data)
        if not verdict.ok:
            record_failure(result, phase, verdict.kind, block, verdict.detail)
            continue
        passed[block] = data
        if healthy is not None:
            before = healthy.get(block)
            if before is not None and before != data:
                record_failure(
                    result, phase, "divergent", block,
                    f"read {describe_block(block, data)}, but with all disks "
                    f"{describe_block(block, before)}",
                )
    return passed


# --------------------------------------------------------------------------------------------
# a campaign of trials, for the test and the tool


@dataclass
class CampaignRow:
    layout: str
    cuts: int = 0
    survived: int = 0
    failed: int = 0
    blocks_checked: int = 0
    acked_blocks: int = 0
    kinds: dict[str, int] = field(default_factory=dict)
    results: list[TrialResult] = field(default_factory=list)

    def add(self, trial: TrialResult) -> None:
        self.cuts += 1
        self.blocks_checked += trial.blocks_checked
        self.acked_blocks += trial.acked_blocks
        if trial.survived:
            self.survived += 1
        else:
            self.failed += 1
            for kind in {f.kind for f in trial.failures}:
                self.kinds[kind] = self.kinds.get(kind, 0) + 1
        self.results.append(trial)


def run_campaign(
    layout_name: str,
    cuts: int,
    *,
    base_seed: int = 0,
    config: TrialConfig | None = None,
    progress: Callable[[TrialResult], None] | None = None,
) -> CampaignRow:
    """`cuts` trials of one layout with seeds base_seed .. base_seed + cuts - 1; the cut
    mode cycles through CUT_MODES so each gets its share."""
    layout = find_layout(layout_name)
    row = CampaignRow(layout_name)
    for index in range(cuts):
        seed = base_seed + index
        trial = run_trial(layout, seed, mode=CUT_MODES[seed % len(CUT_MODES)], config=config)
        row.add(trial)
        if progress is not None:
            progress(trial)
    return row


def format_table(rows: Sequence[CampaignRow]) -> str:
    """A plain-text table: one line per layout."""
    header = ("layout", "cuts", "survived", "failures", "blocks checked", "acked blocks",
              "failure kinds (trials)")
    lines = [header]
    for row in rows:
        kinds = ", ".join(f"{k} {n}" for k, n in sorted(row.kinds.items())) or "-"
        lines.append((row.layout, str(row.cuts), str(row.survived), str(row.failed),
                      str(row.blocks_checked), str(row.acked_blocks), kinds))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = []
    for number, line in enumerate(lines):
        out.append("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True))
                   .rstrip())
        if number == 0:
            out.append("  ".join("-" * width for width in widths))
    return os.linesep.join(out)
