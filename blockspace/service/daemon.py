"""The mount daemon: one process per mounted pool.

pyfuse3 serves the volume files; a control socket in the state directory answers the CLI.
SIGTERM, SIGINT, `blockspace unmount` and an external `fusermount3 -u` all end in the same
clean path: stop serving, flush every disk, close the pool, unmount.
"""

import logging
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyfuse3
import trio

from blockspace.admin.config import load_config
from blockspace.admin.manage import DiskManager
from blockspace.admin.pools import open_devices, pool_status
from blockspace.admin.registry import MountEntry, Registry
from blockspace.disks.devices import Device, FileDevice
from blockspace.disks.faults import FaultyDevice
from blockspace.errors import BlockspaceError, InvalidInput
from blockspace.events.hooks import hooks_dir
from blockspace.geometry.layouts import default_layout
from blockspace.pool.label_copies import repair_label_copies
from blockspace.pool.lease import LeaseOptions, WriterLease
from blockspace.pool.pool import Pool
from blockspace.repair.rebuild import check_rate
from blockspace.repair.scrub import Scrubber, ScrubProgress
from blockspace.repair.watchdog import watch_disks
from blockspace.service import control, sd_notify
from blockspace.service.bringup import bring_up, resync_in_background
from blockspace.service.fault_requests import handle_fault_request
from blockspace.service.fuse_loop import FuseLoop
from blockspace.service.fuse_ops import VolumeFS
from blockspace.service.malloc_tuning import tune_malloc
from blockspace.service.nbd import NbdServer, parse_address
from blockspace.service.observe import REQUESTS as OBSERVER_REQUESTS
from blockspace.service.observe import Observer, Sources
from blockspace.service.status_line import status_line
from blockspace.tiering.admin import check_growable
from blockspace.tiering.admin import overview as tier_overview
from blockspace.tiering.service import TierService
from blockspace.volume.concurrency import leaves as _leaves
from blockspace.volume.volume import Volume

log = logging.getLogger(__name__)
FENCED_EXIT = 75  # the daemon's exit status when another writer took its pool over


@dataclass
class MountOptions:
    pool: str
    mountpoint: str
    uid: int = 0
    gid: int = 0
    allow_other: bool = True
    log_file: str = ""
    allow_fault_injection: bool = False
    io_timeout: float = 30.0
    nbd: str = ""  # where the NBD export listens (a socket path or tcp:HOST:PORT); "" none
    force: bool = False  # take the writer lease whoever holds it (a host known to be dead)
    read_only: bool = False  # the kernel refuses writes to the volume files (mount -o ro)
    hooks_dir: str = ""  # event hooks (default $BLOCKSPACE_HOOKS_DIR or /etc/blockspace/hooks.d)
    metrics: str = ""  # HOST:PORT of the Prometheus endpoint; "" none


class Daemon:
    def __init__(self, registry: Registry, options: MountOptions) -> None:
        self.registry = registry
        self.options = options
        self.pool: Pool | None = None
        self.volumes: dict[str, Volume] = {}
        self.fs: VolumeFS | None = None
        self.fuse = FuseLoop()
        # The fault layer, device path -> FaultyDevice: only with --allow-fault-injection.
        self.faulty: dict[str, FaultyDevice] | None = None
        saved = registry.scrub_state(options.pool)
        self.scrubber = Scrubber(
            lambda: self.volumes, self._save_scrub,
            ScrubProgress.from_state(saved) if saved else None,
            check_labels=self._check_labels,
        )
        self._nursery: trio.Nursery | None = None
        self.disks: DiskManager | None = None
        self.tiers: TierService | None = None
        self.nbd: NbdServer | None = None
        self.lease: WriterLease | None = None
        self.observer: Observer | None = None  # events, counters, metrics (service/observe.py)
        self.notify: Callable[[str], None] = lambda message: None  # `mount` shows these

    async def _claim(self, pool: Pool) -> None:
        """The writer lease, before the first write; kept until the clean stop."""
        self.lease = WriterLease(pool, LeaseOptions(self.options.force, self.notify),
                                 on_lost=fence)
        await self.lease.acquire()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        entry = self.registry.get(self.options.pool)
        devices = open_devices(entry.disks)
        if self.options.allow_fault_injection:  # testing only: `blockspace fault ...`
            faulty = [FaultyDevice(d) for d in devices]
            self.faulty = {d.path: d for d in faulty}
            devices = list(faulty)
        try:
            pool, self.volumes = await bring_up(
                devices, expect_uuid=entry.uuid, io_timeout=self.options.io_timeout,
                claim=self._claim,
            )
            self.pool = pool
            # Tiered volumes are served on top of their (hidden) tier volumes.
            config = load_config()
            self.tiers = tiers = TierService(pool, self.volumes, self.registry.root,
                                             self.options.pool,
                                             period=config.tier_optimizer_period,
                                             rate=config.tier_rate)
            self.observer = observer = Observer(
                Sources(pool, self.options.pool, self.options.mountpoint,
                        lambda: self.disks.rebuilder.progress.to_dict() if self.disks else None,
                        lambda: self.scrubber.progress.to_dict(), lambda: tiers.tiered),
                self.registry.root, hooks=hooks_dir(self.options.hooks_dir or None),
                metrics=self.options.metrics,
                pool_full_percent=config.pool_full_percent)
            self.fs = VolumeFS(tiers.served, uid=self.options.uid, gid=self.options.gid,
                               io=observer.io, on_error=observer.on_io_error)
            fuse_options = set(pyfuse3.default_options)
            fuse_options.add(f"fsname=blockspace:{self.options.pool}")
            fuse_options.add("subtype=blockspace")
            if self.options.allow_other:
                fuse_options.add("allow_other")
            if self.options.read_only:
                fuse_options.add("ro")
            self.fuse.init(self.fs, self.options.mountpoint, fuse_options)
        except BaseException:
            if self.lease is not None:
                self.lease.close()
            for device in devices:
                device.close()
            raise
        lease = self.lease
        assert lease is not None
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(lease.beat)
                socket_path = self.registry.socket_path(self.options.pool)
                await observer.start(nursery)
                await nursery.start(control.serve, socket_path, self._handle_observed)
                if self.options.nbd:  # the same volumes as the files, by name
                    self.nbd = NbdServer(tiers.served, io=observer.io)
                    await nursery.start(self.nbd.serve, parse_address(self.options.nbd),
                                        (self.options.uid, self.options.gid))
                nursery.start_soon(self._watch_signals)
                nursery.start_soon(watch_disks, pool)
                assert pool.intent is not None
                nursery.start_soon(pool.intent.run_cleaner)
                self._nursery = nursery
                self.disks = DiskManager(pool, lambda: self.volumes, self.registry,
                                         self.options.pool, nursery, self._open_device)
                pool.on_disk_failed = self.disks.auto_repair
                nursery.start_soon(self.disks.resume)
                if self.scrubber.active:  # interrupted by a restart: carry on
                    log.info("resuming the scrub interrupted by the last stop")
                    nursery.start_soon(self.scrubber.run)
                for volume in self.volumes.values():
                    nursery.start_soon(resync_in_background, volume)
                tiers.start(nursery)
                self.registry.set_mount(
                    MountEntry(
                        pool=self.options.pool,
                        mountpoint=self.options.mountpoint,
                        pid=os.getpid(),
                        socket=str(socket_path),
                        log_file=self.options.log_file,
                    )
                )
                log.info("pool %s mounted at %s", pool.name, self.options.mountpoint)
                observer.mounted(pool_status(pool)["health"])
                task_status.started()
                sd_notify.notify(f"READY=1\nSTATUS={self.status_line()}")
                nursery.start_soon(sd_notify.report_status, self.status_line)
                await self.fuse.main()
                nursery.cancel_scope.cancel()
        finally:
            # The stop has begun: a second SIGTERM (systemd stopping a .mount unit signals
            # what is left in its cgroup once umount returned) must not cut the flush short.
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            sd_notify.notify("STOPPING=1\nSTATUS=stopping: flushing the disks, unmounting")
            log.info("pool %s: stopping", pool.name)
            if self.tiers is not None:
                self.tiers.save_all()
            with trio.CancelScope(shield=True):
                await observer.stop()
                try:
                    await pool.close_intent_log()  # flushes every disk first
                except BlockspaceError as error:
                    log.error("final flush failed: %s", error)
                await lease.release()
            pool.close()
            for device in devices:
                device.close()
            pyfuse3.close(unmount=True)
            self.registry.clear_mount(self.options.pool)
            log.info("pool %s unmounted (%s)", pool.name, self.fuse.summary())

    def status_line(self) -> str:
        """What systemd shows for this pool (service/status_line.py)."""
        assert self.pool is not None
        states = [d.record.state if d.device is not None or d.record.state != "online"
                  else "missing" for d in self.pool.disks.values()]
        rebuild = self.disks.rebuilder.progress.to_dict() if self.disks is not None else None
        return status_line(states, rebuild, self.scrubber.progress.to_dict())

    def _open_device(self, path: str) -> Device:
        """A disk joining while mounted: behind the fault layer too, when it is allowed."""
        device: Device = FileDevice(path)
        if self.faulty is not None:
            faulty = FaultyDevice(device)
            self.faulty[faulty.path] = faulty
            device = faulty
        return device

    async def _disk_request(self, op: str, request: dict[str, Any]) -> dict[str, Any]:
        manager = self.disks
        assert manager is not None
        if op == "rebuild_rate":
            return manager.set_rate(int(request.get("rate") or 0))
        if op == "rebuild_cancel":
            return await manager.cancel()
        if op == "disk_clear":
            assert self.pool is not None
            disk_id = self.pool.find_disk(str(request["disk"]))
            await self.pool.clear_errors(disk_id)
            return {"cleared": disk_id}
        if "rate" in request:
            manager.rate_limit = check_rate(int(request["rate"] or 0))
        if op == "disk_add":
            ids = await manager.add(list(request["paths"]), request.get("media"),
                                    bool(request.get("force")))
            return {"added": ids}
        if op in ("disk_retire", "disk_remove"):
            return await manager.retire(str(request["disk"]), remove=op == "disk_remove")
        if op == "disk_replace":
            return await manager.replace(str(request["old"]), str(request["new"]),
                                         request.get("media"), bool(request.get("force")))
        if op == "disk_online":
            return await manager.online([str(d) for d in request["disks"]],
                                        request.get("device"))
        if op == "pool_repair":
            return await manager.repair()
        if op == "pool_rebalance":
            return await manager.rebalance()
        if op == "rebuild_status":
            return manager.rebuilder.progress.to_dict()
        raise InvalidInput(f"unknown request {op!r}")

    async def _check_labels(self) -> list[str]:
        return await repair_label_copies(self.pool) if self.pool is not None else []

    def _save_scrub(self, progress: ScrubProgress) -> None:
        self.registry.save_scrub_state(self.options.pool, progress.to_state())

    def _scrub_request(self, op: str, request: dict[str, Any]) -> dict[str, Any]:
        scrubber = self.scrubber
        if op == "scrub_start":
            if scrubber.active:
                raise BlockspaceError("a scrub is already running (see `scrub --status`)")
            name = request.get("volume")
            tiered = self.tiers.tiered.get(str(name)) if self.tiers is not None else None
            if tiered is not None:
                raise InvalidInput(f"volume {name!r} is tiered: scrub its tiers "
                                   f"{tiered.tiers.ssd!r} and {tiered.tiers.hdd!r} (or the pool)")
            if name is not None and name not in self.volumes:
                raise InvalidInput(f"no volume {name!r} in pool {self.options.pool!r}")
            scrubber.plan(name, int(request.get("rate") or 0))
            assert self._nursery is not None
            self._nursery.start_soon(scrubber.run)
        elif op == "scrub_pause":
            scrubber.pause()
        elif op == "scrub_resume":
            scrubber.resume()
        elif op == "scrub_cancel":
            scrubber.cancel()
        elif op != "scrub_status":
            raise InvalidInput(f"unknown request {op!r}")
        return scrubber.progress.to_dict()

    async def _watch_signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info("signal %d: unmounting", signum)
                self.fuse.terminate()

    # ---- control requests -----------------------------------------------------------

    async def _handle_observed(self, request: dict[str, Any]) -> Any:
        """`handle`, and what succeeded told to the observer (volume changes are events)."""
        assert self.observer is not None
        op = request["op"]
        if op in OBSERVER_REQUESTS:
            return self.observer.handle(op, request)
        result = await self.handle(request)
        self.observer.after(op, request, result)
        return result

    async def handle(self, request: dict[str, Any]) -> Any:
        pool = self.pool
        assert pool is not None
        assert self.fs is not None
        op = request["op"]
        if op == "status":
            status = pool_status(pool, self.options.mountpoint, self.scrubber.progress.to_dict(),
                                 lease=self.lease.describe() if self.lease else None)
            if self.disks is not None:
                status["rebuild"] = self.disks.rebuilder.progress.to_dict()
            status["tiers"] = tier_overview(pool)
            if self.nbd is not None:
                status["nbd"] = self.nbd.statistics().to_dict()
            return status
        if op.startswith("tier_"):
            assert self.tiers is not None
            return await self.tiers.handle(op, request)
        if op.startswith(("disk_", "rebuild_")) or op in ("pool_repair", "pool_rebalance"):
            return await self._disk_request(op, request)
        if op.startswith("fault_"):
            return handle_fault_request(pool, self.faulty, op, request)
        if op.startswith("scrub_"):
            return self._scrub_request(op, request)
        if op == "volume_create" and request.get("tiers"):
            assert self.tiers is not None
            return {"name": (await self.tiers.create(request)).name}
        if op == "volume_create":
            spec = default_layout(
                str(request["resiliency"]),
                len(pool.usable_disk_ids()),
                copies=request.get("copies"),
                parity=request.get("parity"),
                columns=request.get("columns"),
                interleave=request.get("interleave"),
            )
            record = await pool.create_volume(
                str(request["name"]), int(request["size"]), spec, str(request["provisioning"])
            )
            self.volumes[record.name] = Volume(pool, record)
            return {"name": record.name}
        if op == "volume_delete":
            name = str(request["name"])
            pool.volume(name)
            if self.nbd is not None and self.nbd.is_open(name):
                raise BlockspaceError(
                    f"volume {name!r} is exported over NBD to a connected client "
                    "(disconnect it first: nbd-client -d, or end the qemu using it)"
                )
            if self.fs.is_open(name):
                raise BlockspaceError(
                    f"volume {name!r} is open (detach its loop device first: losetup -d)"
                )
            assert self.tiers is not None
            await self.tiers.delete(name)  # a tiered volume goes with its tiers
            return {"name": name}
        if op == "volume_grow":
            check_growable(pool, str(request["name"]))
            record = await pool.grow_volume(str(request["name"]), int(request["size"]))
            return {"name": record.name, "size": record.size}
        if op == "unmount":
            served = self.tiers.served() if self.tiers is not None else self.volumes
            busy = [name for name in served if self.fs.is_open(name)
                    or (self.nbd is not None and self.nbd.is_open(name))]
            if busy and not request.get("force"):
                raise BlockspaceError(
                    f"volume {busy[0]!r} is in use (detach its loop device first, "
                    "or unmount with --force)"
                )
            self.fuse.terminate()
            return {"pid": os.getpid()}
        raise InvalidInput(f"unknown request {op!r}")


def fence(reason: str) -> None:
    """Another writer took the pool over (`mount --force` on another host): not one more
    byte from this process may reach the disks, not even the flush of a clean stop, so it
    ends at once. The volumes' FUSE mount then answers ENOTCONN; the pool is the new
    writer's."""
    log.critical("%s: stopping at once, without a final flush", reason)
    logging.shutdown()
    os._exit(FENCED_EXIT)


def run(registry: Registry, options: MountOptions, ready_fd: int | None = None) -> int:
    """Run the daemon in the foreground until unmounted; reports readiness on `ready_fd`."""

    def report(message: str) -> None:
        nonlocal ready_fd
        if ready_fd is not None:
            try:
                os.write(ready_fd, message.encode() + b"\n")
            finally:
                os.close(ready_fd)
                ready_fd = None

    async def main() -> None:
        daemon = Daemon(registry, options)

        def notify(message: str) -> None:  # `mount` prints it while it waits
            if ready_fd is not None:
                os.write(ready_fd, f"wait: {message}".encode()[:4000] + b"\n")

        daemon.notify = notify
        async with trio.open_nursery() as nursery:
            await nursery.start(daemon.run)
            report("ok")

    tune_malloc()  # large request buffers without a page fault per page of each
    try:
        try:
            trio.run(main)
        except BaseExceptionGroup as group:  # trio wraps what failed inside its nurseries
            leaves = _leaves(group)
            if len(leaves) == 1 and isinstance(leaves[0], Exception):
                raise leaves[0] from None
            raise
    except BlockspaceError as error:
        log.error("mount failed: %s", error)
        report(f"error: {error}")
        return 1
    except pyfuse3.FUSEError as error:
        report(f"error: {os.strerror(error.errno)}")
        return 1
    except OSError as error:
        log.error("mount failed: %s", error)
        report(f"error: {error.strerror or error}")
        return 1
    except RuntimeError as error:  # pyfuse3.init raises RuntimeError when the mount fails
        log.error("mount failed: %s", error)
        report(f"error: {error}")
        return 1
    report("error: the daemon stopped before it was ready")
    return 0

