"""The mount daemon: one process per mounted pool.

pyfuse3 serves the volume files; a control socket in the state directory answers the CLI.
SIGTERM, SIGINT, `blockspace unmount` and an external `fusermount3 -u` all end in the same
clean path: stop serving, flush every disk, close the pool, unmount.
"""

import logging
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyfuse3
import trio

from blockspace.admin.manage import DiskManager
from blockspace.admin.pools import open_devices, pool_status
from blockspace.admin.registry import MountEntry, Registry
from blockspace.disks.devices import Device, FileDevice
from blockspace.disks.faults import FaultyDevice
from blockspace.errors import BlockspaceError, InvalidInput
from blockspace.geometry.layouts import default_layout
from blockspace.pool.label_copies import repair_label_copies
from blockspace.pool.pool import Pool
from blockspace.repair.scrub import Scrubber, ScrubProgress
from blockspace.repair.watchdog import watch_disks
from blockspace.service import control
from blockspace.service.bringup import bring_up, resync_in_background
from blockspace.service.fault_requests import handle_fault_request
from blockspace.service.fuse_ops import VolumeFS
from blockspace.service.malloc_tuning import tune_malloc
from blockspace.service.nbd import NbdServer, parse_address
from blockspace.tiering.admin import check_growable
from blockspace.tiering.admin import overview as tier_overview
from blockspace.tiering.service import TierService
from blockspace.volume.concurrency import leaves as _leaves
from blockspace.volume.volume import Volume

log = logging.getLogger(__name__)


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


class Daemon:
    def __init__(self, registry: Registry, options: MountOptions) -> None:
        self.registry = registry
        self.options = options
        self.pool: Pool | None = None
        self.volumes: dict[str, Volume] = {}
        self.fs: VolumeFS | None = None
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

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        entry = self.registry.get(self.options.pool)
        devices = open_devices(entry.disks)
        if self.options.allow_fault_injection:  # testing only: `blockspace fault ...`
            faulty = [FaultyDevice(d) for d in devices]
            self.faulty = {d.path: d for d in faulty}
            devices = list(faulty)
        try:
            pool, self.volumes = await bring_up(
                devices, expect_uuid=entry.uuid, io_timeout=self.options.io_timeout
            )
            self.pool = pool
            # Tiered volumes are served on top of their (hidden) tier volumes.
            self.tiers = tiers = TierService(pool, self.volumes, self.registry.root,
                                             self.options.pool)
            self.fs = VolumeFS(tiers.served, uid=self.options.uid, gid=self.options.gid)
            fuse_options = set(pyfuse3.default_options)
            fuse_options.add(f"fsname=blockspace:{self.options.pool}")
            fuse_options.add("subtype=blockspace")
            if self.options.allow_other:
                fuse_options.add("allow_other")
            pyfuse3.init(self.fs, self.options.mountpoint, fuse_options)
        except BaseException:
            for device in devices:
                device.close()
            raise
        try:
            async with trio.open_nursery() as nursery:
                socket_path = self.registry.socket_path(self.options.pool)
                await nursery.start(control.serve, socket_path, self.handle)
                if self.options.nbd:  # the same volumes as the files, by name
                    self.nbd = NbdServer(tiers.served)
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
                task_status.started()
                await pyfuse3.main()
                nursery.cancel_scope.cancel()
        finally:
            log.info("pool %s: stopping", pool.name)
            if self.tiers is not None:
                self.tiers.save_all()
            with trio.CancelScope(shield=True):
                try:
                    await pool.close_intent_log()  # flushes every disk first
                except BlockspaceError as error:
                    log.error("final flush failed: %s", error)
            pool.close()
            for device in devices:
                device.close()
            pyfuse3.close(unmount=True)
            self.registry.clear_mount(self.options.pool)
            log.info("pool %s unmounted", pool.name)

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
        if "rate" in request:
            manager.rate_limit = int(request["rate"] or 0)
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
                pyfuse3.terminate()

    # ---- control requests -----------------------------------------------------------

    async def handle(self, request: dict[str, Any]) -> Any:
        pool = self.pool
        assert pool is not None
        assert self.fs is not None
        op = request["op"]
        if op == "status":
            status = pool_status(pool, self.options.mountpoint, self.scrubber.progress.to_dict())
            if self.disks is not None:
                status["rebuild"] = self.disks.rebuilder.progress.to_dict()
            status["tiers"] = tier_overview(pool)
            if self.nbd is not None:
                status["nbd"] = self.nbd.statistics().to_dict()
            return status
        if op.startswith("tier_"):
            assert self.tiers is not None
            return await self.tiers.handle(op, request)
        if op.startswith("disk_") or op in ("pool_repair", "pool_rebalance", "rebuild_status"):
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
            pyfuse3.terminate()
            return {"pid": os.getpid()}
        raise InvalidInput(f"unknown request {op!r}")


def setup_logging(log_file: str, level: int = logging.INFO) -> None:
    handler: logging.Handler
    if log_file:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(log_file)
    else:
        handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


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

