"""One writer per pool, enforced on the disks: the host lock of every member (by disk UUID,
blockspace/disks/hostlock.py) and the on-disk lease (blockspace/ondisk/lease.py), taken
before the first write, beaten while writing, released at a clean stop.

The daemon takes it between opening the pool and its first commit, and beats it in its
nursery; every offline command that writes takes it for its run (blockspace/admin/pools.py).
Who may take a lease held by someone else is decided by blockspace/pool/takeover.py.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio
import xxhash

from blockspace.disks.devices import Device
from blockspace.disks.gate import GatedDevice
from blockspace.disks.hostlock import DiskInUse, HostLock
from blockspace.errors import BlockspaceError, DeviceError, FormatError, HostSpaceError
from blockspace.ondisk.label import LEASE_SIZE, check_uuid
from blockspace.ondisk.lease import MAX_WAIT, Holder, Lease, decode_lease, encode_lease
from blockspace.pool.pool import Pool, PoolDisk
from blockspace.pool.takeover import Reading, after_wait, first_look, watch_time

log = logging.getLogger(__name__)

BEAT_INTERVAL = 2.0  # seconds between heartbeats
# How long another host's lease must stand still before it is taken over: many beats, so a
# holder slowed down (a busy disk, a paused VM) is not mistaken for a dead one.
TAKEOVER_TIMEOUT = 15.0
NO_BOOT_ID = "00000000-0000-0000-0000-000000000000"


def _read_text(path: str) -> str:
    try:
        with open(path) as handle:
            return handle.read().strip()
    except OSError:
        return ""


def process_start(pid: int) -> int | None:
    """When process `pid` started (clock ticks since boot), None if there is none (or only
    a zombie): with the pid it names one process, a reused pid being another."""
    text = _read_text(f"/proc/{pid}/stat")
    try:
        fields = text.rsplit(")", 1)[1].split()
        if fields[0] == "Z":
            return None
        return int(fields[19])  # field 22 of the line; the first two are before ")"
    except (IndexError, ValueError):
        return None


def this_holder() -> Holder:
    """This process as a lease holder: /etc/machine-id (else the host name) for the host."""
    # Shown to people only: printable ASCII, whatever the host calls itself.
    name = "".join(c if "!" <= c <= "~" else "_" for c in socket.gethostname())[:255]
    name = name or "localhost"
    machine = _read_text("/etc/machine-id")
    if re.fullmatch(r"[0-9a-f]{32}", machine) is not None:
        host_id = machine
    else:  # no machine id (a minimal container): the host name, in lease-id characters
        host_id = re.sub(r"[^A-Za-z0-9._-]", "_", name)[:64]
    try:
        boot_id = check_uuid("boot id", _read_text("/proc/sys/kernel/random/boot_id"))
    except FormatError:
        boot_id = NO_BOOT_ID
    pid = os.getpid()
    return Holder(host_id=host_id or "localhost", host_name=name, boot_id=boot_id, pid=pid,
                  pid_start=process_start(pid) or 0)


def holder_alive(holder: Holder, me: Holder) -> bool:
    """A holder on this host and boot whose process still runs."""
    return (holder.same_host(me) and holder.boot_id == me.boot_id
            and process_start(holder.pid) == holder.pid_start)


def _ignore(message: str) -> None:
    pass


@dataclass(frozen=True)
class LeaseOptions:
    """How a writer takes the lease: `force` takes it whoever holds it (only for a holder
    known to be dead); `notify` hears that we are waiting for another host's lease."""

    force: bool = False
    notify: Callable[[str], None] = field(default=_ignore)


class LeaseLost(BlockspaceError):
    """Another writer took the pool over while we held it."""


def _members(pool: Pool) -> list[tuple[PoolDisk, Device]]:
    """Every member this process has open, in service or not: a stale disk left unleased
    could be opened alone elsewhere and written."""
    found = []
    for disk in pool.disks.values():
        device = disk.device or disk.returned
        if device is not None:
            found.append((disk, device))
    return found


async def read_readings(pool: Pool, me: Holder) -> list[Reading]:
    """The lease block of every member this process has open, read concurrently (a hung
    disk costs one I/O timeout, not one per disk)."""
    members = _members(pool)
    readings: list[Reading | None] = [None] * len(members)

    async def read_one(index: int, disk: PoolDisk, device: Device) -> None:
        readings[index] = await _read_one(pool, disk, device, me)

    async with trio.open_nursery() as nursery:
        for index, (disk, device) in enumerate(members):
            nursery.start_soon(read_one, index, disk, device)
    return [r for r in readings if r is not None]


async def _read_one(pool: Pool, disk: PoolDisk, device: Device, me: Holder) -> Reading:
    disk_id = disk.record.disk_id
    raw = b""
    try:
        with trio.move_on_after(pool.io_timeout):  # a hung disk must not stall a beat
            raw = await device.read(disk.geometry.lease_offset, LEASE_SIZE)
    except DeviceError as error:
        return Reading(disk_id, None, damage=f"read error: {error}")
    if not raw:
        return Reading(disk_id, None, damage="no answer to the lease read")
    digest = xxhash.xxh3_64_intdigest(raw)
    try:
        lease = decode_lease(raw, pool.uuid, disk.record.disk_uuid)
    except FormatError as error:
        return Reading(disk_id, None, damage=str(error), digest=digest)
    alive = lease is not None and holder_alive(lease.holder, me)
    return Reading(disk_id, lease, digest=digest, alive=alive)


def summary(readings: list[Reading]) -> dict[str, Any]:
    """What `pool status` shows of the leases: the newest held one (who writes the pool),
    else whether any disk has one."""
    held = [r for r in readings if r.lease is not None and r.lease.held]
    damaged = [r.disk_id for r in readings if r.damage is not None]
    if held:
        newest = max(held, key=lambda r: r.lease.counter if r.lease else 0)
        lease = newest.lease
        assert lease is not None
        h = lease.holder
        return {"state": "held", "host": h.host_name, "host_id": h.host_id, "pid": h.pid,
                "counter": lease.counter, "time": lease.time, "running": newest.alive,
                "disks": sorted(r.disk_id for r in held), "damaged": damaged}
    state = "released" if any(r.lease is not None for r in readings) else "none"
    return {"state": state, "damaged": damaged}


async def lease_summary(pool: Pool) -> dict[str, Any]:
    """The lease as an offline, read-only `pool status` reports it (it takes nothing)."""
    return summary(await read_readings(pool, this_holder()))


class WriterLease:
    """This process's claim to write `pool`."""

    def __init__(
        self, pool: Pool, options: LeaseOptions | None = None, *, me: Holder | None = None,
        lock_dir: str | None = None, interval: float = BEAT_INTERVAL,
        timeout: float = TAKEOVER_TIMEOUT, on_lost: Callable[[str], None] | None = None,
    ) -> None:
        self.pool = pool
        self.options = options or LeaseOptions()
        self.me = me or this_holder()
        self.lock_dir = lock_dir
        self.interval = interval
        self.timeout = timeout
        self.on_lost = on_lost
        self.locks: dict[str, HostLock] = {}  # disk uuid -> its host lock
        self.counter = 0
        self.held = False
        self.pending = False  # taken, not yet written (`acquire(defer=True)`)
        self.lost: str | None = None
        self.last_beat = 0.0

    def _lock_members(self) -> None:
        """The host lock of every member not locked yet (one that joined since, too)."""
        for disk, _ in _members(self.pool):
            uuid = disk.record.disk_uuid
            if uuid in self.locks:
                continue
            self.locks[uuid] = HostLock.acquire(
                uuid, what=f"pool {self.pool.name!r} disk {disk.record.disk_id}",
                device_path=disk.path, directory=self.lock_dir)

    async def acquire(self, *, defer: bool = False) -> None:
        """Take the host locks and the lease, or raise DiskInUse saying who holds them.
        Nothing of the pool is written before this returns. With `defer` the lease is
        written by `write_first` (before the first write of the caller: a command that
        ends up writing nothing leaves the disks untouched)."""
        try:
            self._lock_members()
            readings = await read_readings(self.pool, self.me)
            decision = first_look(readings, self.me, force=self.options.force)
            if decision.verdict == "wait":
                watch = watch_time(readings, self.me, self.timeout)
                message = (f"pool {self.pool.name!r}: {decision.reason}; waiting "
                           f"{watch:g}s to see whether it is still beating (if that "
                           "host is known to be dead, --force takes it at once)")
                log.warning("%s", message)
                self.options.notify(message)
                await trio.sleep(watch)
                later = await read_readings(self.pool, self.me)
                decision = after_wait(readings, later, self.me, waited=watch,
                                      force=self.options.force)
                readings = later
            if decision.verdict != "take":
                raise DiskInUse(f"pool {self.pool.name!r} is in use by another writer: "
                                f"{decision.reason}")
            if self.options.force:
                log.warning("pool %s: lease taken by --force", self.pool.name)
            self.counter = max((r.lease.counter for r in readings if r.lease is not None),
                               default=0)
            self.pending = True
            if not defer:
                await self.write_first()
        except BaseException:
            self.close()
            raise
        log.info("pool %s: writer lease taken (%s)", self.pool.name, decision.reason)

    async def write_first(self) -> None:
        """Write the lease taken by `acquire`, once: from now on it is beaten."""
        if self.pending:
            self.pending = False
            await self._write_all("held")
            self.held = True

    async def _write_all(self, state: str) -> list[tuple[PoolDisk, DeviceError]]:
        """Write the lease (the next beat) to every member, durably, each within the I/O
        timeout; returns the disks in service that could not take it (and why). A member
        out of service that cannot is only logged."""
        self.counter += 1
        self.last_beat = time.time()
        # Beats can be this far apart (one waits for the slowest disk, up to the I/O
        # timeout); a taker watches at least that long, with a margin of two beats.
        wait = min(MAX_WAIT, max(self.timeout, 3 * self.interval + self.pool.io_timeout))
        failed: list[tuple[PoolDisk, DeviceError]] = []

        async def write_one(disk: PoolDisk, member: Device) -> None:
            device = member.inner if isinstance(member, GatedDevice) else member
            lease = Lease(self.pool.uuid, disk.record.disk_uuid, self.me, self.counter,
                          self.last_beat, state, wait)

            async def write(target: Device) -> None:
                await target.write(disk.geometry.lease_offset, encode_lease(lease))
                await target.flush()

            try:
                await self.pool.disk_io(disk, "lease write", write, device=device,
                                        offset=disk.geometry.lease_offset, length=LEASE_SIZE)
            except HostSpaceError as error:  # the host is full, not the disk broken
                self.pool.note_host_full(disk.record.disk_id, error)
                log.warning("disk %d: lease not written: %s", disk.record.disk_id, error)
            except DeviceError as error:
                log.warning("disk %d: lease not written: %s", disk.record.disk_id, error)
                if member is disk.device and disk.usable:
                    failed.append((disk, error))

        async with trio.open_nursery() as nursery:  # one slow disk does not delay the rest
            for disk, member in _members(self.pool):
                nursery.start_soon(write_one, disk, member)
        return failed

    async def _fence_if_taken(self) -> None:
        """Read every member's lease: if another writer holds one, stop (LeaseLost, and
        `on_lost`: the daemon exits 75)."""
        for reading in await read_readings(self.pool, self.me):
            lease = reading.lease
            if lease is not None and lease.held and lease.holder != self.me:
                self.held = False
                self.lost = (f"pool {self.pool.name!r}: disk {reading.disk_id} was taken over "
                             f"by {lease.holder.describe()}")
                log.critical("%s: this process stops writing", self.lost)
                if self.on_lost is not None:
                    self.on_lost(self.lost)
                raise LeaseLost(self.lost)

    async def beat_once(self) -> None:
        """One heartbeat: first make sure nobody took the pool over (then stop: LeaseLost,
        or `on_lost`), then the next counter on every disk, read back (the same check
        again); a disk in service that could not take it is failed, durably."""
        if not self.held:
            return
        try:
            self._lock_members()
        except BlockspaceError as error:  # a disk that joined is locked elsewhere: odd
            log.error("%s", error)
        await self._fence_if_taken()
        failed = await self._write_all("held")
        # Read back: a writer that raced this beat (it looked before we wrote, and wrote
        # after) is seen now, not a beat later.
        await self._fence_if_taken()
        for disk, problem in failed:
            # A disk in service that cannot take the beat failed a write like any other:
            # out of service, durably (the I/O path's rule), not merely logged.
            disk_id = disk.record.disk_id
            self.pool.count_device_error(disk_id, "write")
            await self.pool.mark_failed(disk_id, f"the lease write failed: {problem}")

    async def beat(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                   ) -> None:
        """Beat every `interval` seconds (once the lease is written) until cancelled."""
        task_status.started()
        while True:
            await trio.sleep(self.interval)
            await self.beat_once()

    async def release(self) -> None:
        """Clean stop: the lease says released (unless it was lost), the host locks go."""
        try:
            self.pending = False  # never written: nothing to release on the disks
            if self.held:
                self.held = False
                await self._write_all("released")
        finally:
            self.close()

    def close(self) -> None:
        """Drop the host locks (the on-disk lease stays as it is: a dead pid on this host
        is taken over at once)."""
        for lock in self.locks.values():
            lock.release()
        self.locks.clear()

    def describe(self) -> dict[str, Any]:
        """The daemon's `pool status` view of its own lease."""
        if self.lost is not None:
            return {"state": "lost", "reason": self.lost}
        if not self.held:
            return {"state": "released"}
        return {"state": "held", "host": self.me.host_name, "host_id": self.me.host_id,
                "pid": self.me.pid, "counter": self.counter, "time": self.last_beat,
                "running": True, "disks": sorted(d.record.disk_id for d, _ in
                                                 _members(self.pool)), "damaged": []}

