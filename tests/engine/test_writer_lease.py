"""One writer per pool, in-process on image files (issue 16 item 6), and a device shorter
than its label (issue 17 item 5): the host lock by disk UUID, the on-disk lease taken,
watched, beaten, released and lost, and the truncated member that is never online."""

from __future__ import annotations

import dataclasses
import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio

from blockspace.admin.pools import opened_disks, pool_status
from blockspace.disks.devices import FileDevice
from blockspace.disks.faults import FaultSpec, FaultyDevice
from blockspace.disks.hostlock import DiskInUse, HostLock
from blockspace.errors import BlockspaceError
from blockspace.ondisk.label import LEASE_SIZE
from blockspace.ondisk.lease import Holder, Lease, decode_lease, encode_lease
from blockspace.pool.lease import (
    LeaseLost,
    LeaseOptions,
    WriterLease,
    lease_summary,
    process_start,
    read_readings,
    this_holder,
)
from blockspace.pool.pool import Pool

MIB = 1 << 20
DISK = 32 * MIB
OTHER_HOST = Holder("bbbb2222", "beta", "1c8e5d4c-3a2f-4e1d-9c8b-7a6f5e4d3c2b", 77, 5)


def make_pool(tmp_path: Path, disks: int = 2) -> tuple[list[Path], str]:
    paths = []
    for i in range(disks):
        path = tmp_path / f"d{i}.img"
        with open(path, "wb") as handle:
            handle.truncate(DISK)
        paths.append(path)

    async def create() -> str:
        devices = [FileDevice(str(p)) for p in paths]
        try:
            pool = await Pool.create("tank", devices, media=["hdd"] * disks, slab_size=MIB,
                                     meta_slot_size=64 << 10)
            return pool.uuid
        finally:
            for device in devices:
                device.close()

    return paths, trio.run(create)


async def open_pool(paths: list[Path], *, exclusive: bool = True) -> Pool:
    return await Pool.open([FileDevice(str(p), exclusive=exclusive) for p in paths])


def close(pool: Pool) -> None:
    pool.close()


def lease_on(pool: Pool, disk_id: int) -> Lease | None:
    disk = pool.disks[disk_id]
    device = disk.device or disk.returned
    assert device is not None
    raw = device.read_sync(disk.geometry.lease_offset, LEASE_SIZE)
    return decode_lease(raw, pool.uuid, disk.record.disk_uuid)


async def plant(pool: Pool, holder: Holder, counter: int, state: str = "held",
                wait: float = 0.1) -> None:
    """What another writer leaves on every disk."""
    for disk in pool.disks.values():
        assert disk.device is not None
        record = Lease(pool.uuid, disk.record.disk_uuid, holder, counter, 1.0, state, wait)
        await disk.device.write(disk.geometry.lease_offset, encode_lease(record))


def test_the_lease_is_written_beaten_and_released(tmp_path: Path) -> None:
    paths, _ = make_pool(tmp_path)

    async def scenario() -> None:
        pool = await open_pool(paths)
        try:
            assert (await lease_summary(pool))["state"] == "none"  # a pool made before
            lease = WriterLease(pool)
            await lease.acquire()
            first = lease_on(pool, 0)
            assert first is not None
            assert first.held
            assert first.holder == this_holder()
            await lease.beat_once()
            second = lease_on(pool, 1)
            assert second is not None
            assert second.counter == first.counter + 1
            summary = await lease_summary(pool)
            assert summary["state"] == "held"
            assert summary["pid"] == os.getpid()
            assert summary["running"] is True
            assert summary["disks"] == [0, 1]
            assert pool_status(pool, lease=lease.describe())["lease"]["state"] == "held"
            await lease.release()
            released = lease_on(pool, 0)
            assert released is not None
            assert released.state == "released"
            assert not lease.locks  # the host locks went with it
        finally:
            close(pool)

    trio.run(scenario)


def test_a_second_writer_on_this_host_is_refused_whatever_path_it_uses(
    tmp_path: Path,
) -> None:
    """The same images opened again (through symlinks, as a loop device or /dev/disk/by-*
    would be: the per-path flock cannot see it) are refused by the host lock of their disk
    UUIDs, naming the holder's pid and the path it holds."""
    paths, _ = make_pool(tmp_path)
    links = []
    for path in paths:
        link = tmp_path / f"link-{path.name}"
        link.symlink_to(path)
        links.append(link)

    async def scenario() -> None:
        first = await open_pool(paths)
        second = await open_pool(links, exclusive=False)
        try:
            holder = WriterLease(first)
            await holder.acquire()
            intruder = WriterLease(second)
            with pytest.raises(DiskInUse) as caught:
                await intruder.acquire()
            message = str(caught.value)
            assert "\n" not in message
            assert message.startswith("pool 'tank' disk 0 (disk uuid ")
            assert f"this process (pid {os.getpid()}) holds it through {paths[0]}" in message
            assert not intruder.locks  # what it did lock, it let go
            await holder.release()
            await intruder.acquire()  # free once the first let go
            await intruder.release()
        finally:
            close(first)
            close(second)

    trio.run(scenario)


def test_another_hosts_beating_lease_is_refused_after_watching_it(tmp_path: Path) -> None:
    paths, _ = make_pool(tmp_path)
    heard: list[str] = []

    async def scenario() -> None:
        pool = await open_pool(paths)
        try:
            await plant(pool, OTHER_HOST, 5)

            async def other_host_beats() -> None:
                for counter in range(6, 1000):
                    await trio.sleep(0.05)
                    await plant(pool, OTHER_HOST, counter)

            lease = WriterLease(pool, LeaseOptions(notify=heard.append), timeout=0.5)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(other_host_beats)
                with pytest.raises(DiskInUse) as caught:
                    await lease.acquire()
                nursery.cancel_scope.cancel()
            message = str(caught.value)
            assert message.startswith("pool 'tank' is in use by another writer: disk ")
            assert "host beta (machine id bbbb2222), pid 77" in message
            assert "changed within 0.5s" in message
            assert len(heard) == 1
            assert "waiting 0.5s" in heard[0]
            assert "--force" in heard[0]
            current = lease_on(pool, 0)
            assert current is not None
            assert current.holder == OTHER_HOST
        finally:
            close(pool)

    trio.run(scenario)


def test_another_hosts_stale_lease_is_taken_after_the_timeout(tmp_path: Path) -> None:
    paths, _ = make_pool(tmp_path)
    heard: list[str] = []

    async def scenario() -> None:
        pool = await open_pool(paths)
        try:
            await plant(pool, OTHER_HOST, 41)
            lease = WriterLease(pool, LeaseOptions(notify=heard.append), timeout=0.2)
            start = trio.current_time()
            await lease.acquire()
            assert trio.current_time() - start >= 0.2  # it did wait and re-read
            taken = lease_on(pool, 1)
            assert taken is not None
            assert taken.holder == this_holder()
            assert taken.counter == 42  # the counter goes on from the old holder's
            assert heard
            assert "host beta" in heard[0]
            await lease.release()
        finally:
            close(pool)

    trio.run(scenario)


def test_a_holder_that_asks_for_a_longer_watch_gets_it(tmp_path: Path) -> None:
    """Beats of a holder with a long I/O timeout can be far apart: it records how long a
    taker must watch, and a taker with a shorter timeout of its own waits that long."""
    paths, _ = make_pool(tmp_path)
    heard: list[str] = []

    async def scenario() -> None:
        pool = await open_pool(paths)
        try:
            await plant(pool, OTHER_HOST, 5, wait=0.6)
            lease = WriterLease(pool, LeaseOptions(notify=heard.append), timeout=0.1)
            start = trio.current_time()
            await lease.acquire()
            assert trio.current_time() - start >= 0.6
            assert "waiting 0.6s" in heard[0]
            written = lease_on(pool, 0)
            assert written is not None
            # Ours asks for our beat interval three times plus the I/O timeout.
            assert written.wait == 3 * lease.interval + pool.io_timeout
            await lease.release()
        finally:
            close(pool)

    trio.run(scenario)


def test_force_takes_a_live_lease_at_once(tmp_path: Path) -> None:
    paths, _ = make_pool(tmp_path)

    async def scenario() -> None:
        pool = await open_pool(paths)
        try:
            await plant(pool, OTHER_HOST, 3)
            lease = WriterLease(pool, LeaseOptions(force=True), timeout=3600)
            with trio.fail_after(30):
                await lease.acquire()
            taken = lease_on(pool, 0)
            assert taken is not None
            assert taken.holder == this_holder()
            await lease.release()
        finally:
            close(pool)

    trio.run(scenario)


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_our_hosts_lease_of_a_dead_process_is_taken_at_once(tmp_path: Path) -> None:
    """A daemon killed with kill -9 leaves its lease held; its host comes back to it at
    once (no take-over wait): the pid is dead. A live one (this process under another
    identity) is refused."""
    paths, _ = make_pool(tmp_path)

    async def scenario() -> None:
        pool = await open_pool(paths)
        try:
            me = this_holder()
            gone = dataclasses.replace(me, pid=dead_pid(), pid_start=1)
            await plant(pool, gone, 7)
            lease = WriterLease(pool, timeout=3600)
            with trio.fail_after(30):
                await lease.acquire()
            await lease.release()
            parent = os.getppid()
            alive = dataclasses.replace(me, pid=parent, pid_start=process_start(parent) or 0)
            await plant(pool, alive, 8)
            with pytest.raises(DiskInUse, match=f"held by pid {os.getppid()} on this host"):
                await WriterLease(pool, timeout=3600).acquire()
        finally:
            close(pool)

    trio.run(scenario)


def test_a_lease_taken_over_stops_the_old_writer(tmp_path: Path) -> None:
    paths, _ = make_pool(tmp_path)
    lost: list[str] = []

    async def scenario() -> None:
        pool = await open_pool(paths)
        try:
            lease = WriterLease(pool, on_lost=lost.append)
            await lease.acquire()
            await plant(pool, OTHER_HOST, 1000)  # `mount --force` on host beta
            with pytest.raises(LeaseLost, match="disk 0 was taken over by host beta"):
                await lease.beat_once()
            assert lost
            assert "host beta" in lost[0]
            assert lease.describe()["state"] == "lost"
            await lease.release()
            kept = lease_on(pool, 0)
            assert kept is not None
            assert kept.holder == OTHER_HOST
        finally:
            close(pool)

    trio.run(scenario)


def test_offline_work_that_writes_nothing_leaves_the_lease_unwritten(tmp_path: Path) -> None:
    paths, uuid = make_pool(tmp_path)

    async def scenario() -> None:
        async with opened_disks([str(p) for p in paths], uuid, "tank",
                                writer=LeaseOptions()) as pool:
            assert lease_on(pool, 0) is None  # locked on this host, nothing written
        async with opened_disks([str(p) for p in paths], uuid, "tank",
                                writer=LeaseOptions()) as pool:
            await pool.commit()  # the first write takes the lease onto the disks first
            held = lease_on(pool, 0)
            assert held is not None
            assert held.held
        async with opened_disks([str(p) for p in paths], uuid, "tank") as pool:
            released = lease_on(pool, 1)
            assert released is not None
            assert released.state == "released"

    trio.run(scenario)


# ---- a device shorter than its label --------------------------------------------------------


def test_a_truncated_member_is_not_online_and_says_why(tmp_path: Path) -> None:
    paths, _ = make_pool(tmp_path, disks=3)
    os.truncate(paths[2], DISK // 2)

    async def scenario() -> None:
        pool = await open_pool(paths)
        try:
            disk = pool.disks[2]
            assert disk.device is None
            assert disk.returned is None
            assert disk.record.state == "failed"
            status = pool_status(pool)
            entry = status["disks"][2]
            assert entry["state"] == "failed"
            assert entry["state_reason"].startswith(
                f"device is {DISK // 2} bytes, label says {DISK}")
            assert status["health"] == "degraded"
            assert [d["state"] for d in status["disks"][:2]] == ["online", "online"]
            await pool.note_missing_disks()  # the mount records it
        finally:
            close(pool)
        reopened = await open_pool(paths[:2])
        try:
            assert reopened.disks[2].record.state == "failed"
            assert "label says" in reopened.disks[2].record.state_reason
        finally:
            close(reopened)

    trio.run(scenario)


def test_the_host_lock_lives_in_a_private_directory(tmp_path: Path) -> None:
    directory = tmp_path / "run" / "locks"
    uuid = "5c0e8d4c-3a2f-4e1d-9c8b-7a6f5e4d3c2b"
    lock = HostLock.acquire(uuid, what="pool 'tank' disk 0", device_path="/dev/loop9",
                            directory=str(directory))
    try:
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700
        path = directory / f"{uuid}.lock"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert json.loads(path.read_text()) == {"pid": os.getpid(), "path": "/dev/loop9"}
        with pytest.raises(DiskInUse) as caught:
            HostLock.acquire(uuid, what="pool 'tank' disk 0", device_path="/x",
                             directory=str(directory))
        assert str(caught.value) == (
            f"pool 'tank' disk 0 (disk uuid {uuid}) is in use by another writer on this host: "
            f"this process (pid {os.getpid()}) holds it through /dev/loop9")
    finally:
        lock.release()
    assert not lock.held
    HostLock.acquire(uuid, what="x", device_path="/x", directory=str(directory)).release()
    blocked = tmp_path / "file"
    blocked.write_text("")
    with pytest.raises(BlockspaceError, match="cannot create its lock in"):
        HostLock.acquire(uuid, what="pool 'tank' disk 0", device_path="/x",
                         directory=str(blocked / "locks"))


def test_a_disk_that_does_not_answer_or_fails_the_lease_read_is_watched(
    tmp_path: Path,
) -> None:
    """A lease that cannot be read is nobody's for sure: it is watched like another host's
    (and taken when it stays as it was), and a hung disk does not hang the writer."""
    paths, _ = make_pool(tmp_path)

    async def scenario() -> None:
        pool = await Pool.open([FaultyDevice(FileDevice(str(p))) for p in paths])
        try:
            pool.io_timeout = 0.2
            hung = pool.disks[0].device
            failing = pool.disks[1].device
            assert isinstance(hung, FaultyDevice)
            assert isinstance(failing, FaultyDevice)
            hung.set_spec(FaultSpec(latency=3600))
            failing.set_spec(FaultSpec(read_error=1.0))
            me = this_holder()
            with trio.fail_after(30):
                readings = await read_readings(pool, me)
            assert readings[0].damage == "no answer to the lease read"
            assert readings[1].damage is not None
            assert readings[1].damage.startswith("read error: ")
            heard: list[str] = []
            lease = WriterLease(pool, LeaseOptions(notify=heard.append), timeout=0.1)
            failing.set_spec(FaultSpec())
            hung.set_spec(FaultSpec(read_error=1.0))
            await lease.acquire()  # unreadable twice alike: taken after the wait
            assert heard
            assert "disk 0: its lease is unreadable (read error: " in heard[0]
            await lease.release()
        finally:
            pool.close()

    trio.run(scenario)


@pytest.mark.parametrize("machine_id", [True, False])
def test_any_host_name_makes_a_valid_lease(
    monkeypatch: pytest.MonkeyPatch, machine_id: bool
) -> None:
    if not machine_id:  # a container without /etc/machine-id: the host name is the id
        monkeypatch.setattr("blockspace.pool.lease._read_text",
                            lambda path: "" if path == "/etc/machine-id" else
                            Path(path).read_text().strip())
    for name in ("", "héte ünïcode", "a" * 300, "ok-host.example"):
        monkeypatch.setattr("socket.gethostname", lambda name=name: name)
        holder = this_holder()
        assert holder.host_name
        record = Lease("3f2b6c1e-8a4d-4c6b-9f1e-2d3c4b5a6978",
                       "a1b2c3d4-e5f6-4a7b-8c9d-0e1f2a3b4c5d", holder, 1, 1.0, "held")
        raw = encode_lease(record)
        assert decode_lease(raw, record.pool_uuid, record.disk_uuid) == record


class RacingDevice(FileDevice):
    """A disk that another writer's lease reaches right after ours (armed: once), as when
    two writers race the same heartbeat: it looked before our beat, wrote after it."""

    racer: bytes | None = None
    lease_offset = -1

    async def write(self, offset: int, data: Any) -> None:
        await super().write(offset, data)
        if offset == self.lease_offset and self.racer is not None:
            racer, self.racer = self.racer, None
            await super().write(offset, racer)


def test_a_writer_racing_the_beat_is_seen_by_that_beat(tmp_path: Path) -> None:
    """The beat reads the lease back after writing it: another holder found there fences
    this writer at once (the daemon's `on_lost` exits 75), not at the next beat."""
    paths, _ = make_pool(tmp_path)
    lost: list[str] = []

    async def scenario() -> None:
        devices = [RacingDevice(str(p)) for p in paths]
        pool = await Pool.open(list(devices))
        try:
            lease = WriterLease(pool, on_lost=lost.append)
            await lease.acquire()
            disk = pool.disks[0]
            racing = devices[0] if devices[0].path == disk.path else devices[1]
            racing.lease_offset = disk.geometry.lease_offset
            racing.racer = encode_lease(Lease(pool.uuid, disk.record.disk_uuid, OTHER_HOST,
                                              1000, 1.0, "held", 0.1))
            with pytest.raises(LeaseLost, match="taken over by host beta"):
                await lease.beat_once()
            assert racing.racer is None  # premise: the race happened in this beat
            assert lost
            assert lease.describe()["state"] == "lost"
        finally:
            close(pool)

    trio.run(scenario)


def test_a_beat_a_disk_cannot_take_fails_that_disk_durably(tmp_path: Path) -> None:
    """A write error on the lease block is the disk's write error: counted, and the disk
    out of service in a committed generation (as after a failed data write), not only a
    line in the log. The other disk keeps the pool and its lease."""
    paths, _ = make_pool(tmp_path, disks=3)

    async def scenario() -> None:
        devices = [FaultyDevice(FileDevice(str(p))) for p in paths]
        pool = await Pool.open(list(devices))
        try:
            lease = WriterLease(pool)
            await lease.acquire()
            disk = pool.disks[1]
            faulty = disk.device
            assert isinstance(faulty, FaultyDevice)
            faulty.set_spec(FaultSpec(write_error=1.0,
                                      ranges=((disk.geometry.lease_offset, LEASE_SIZE),)))
            await lease.beat_once()
            assert pool.disks[1].record.state == "failed"
            assert "lease write failed" in pool.disks[1].record.state_reason
            assert pool.disks[1].errors["write"] >= 1
            assert pool.disks[0].record.state == "online"
            await lease.release()
        finally:
            close(pool)
            for device in devices:  # the failed disk's handle too
                device.close()
        reopened = await open_pool(paths)  # what a crash now would find on the disks
        try:
            assert reopened.disks[1].record.state == "failed"
        finally:
            close(reopened)

    trio.run(scenario)
