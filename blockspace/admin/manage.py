"""Disk management: add, retire, remove, replace, and repair onto free space.

Shared by the daemon (online, rebuilds in its nursery) and the CLI on an unmounted pool
(same code, run to completion in the CLI process). Every operation checks that it can
finish (free space, disk sizes, state) before it changes anything.
"""

import logging
import os
from collections.abc import Callable
from typing import Any

import trio

from blockspace.admin.pools import check_new_disks
from blockspace.admin.registry import PoolEntry, Registry
from blockspace.disks.devices import Device, FileDevice
from blockspace.errors import BlockspaceError, DeviceError, InvalidInput, NoSpace
from blockspace.pool.pool import Pool
from blockspace.repair.readmit import (
    RETURNING_STATES,
    catch_up_disks,
    check_return_order,
    prepare,
    returning_order,
)
from blockspace.repair.rebuild import (
    EVACUATE_STATES,
    Move,
    Rebuilder,
    RebuildProgress,
    check_moves_fit,
    check_moves_sources,
    plan_moves,
    plan_rebalance,
)
from blockspace.volume.volume import Volume

log = logging.getLogger(__name__)


class DiskManager:
    def __init__(
        self,
        pool: Pool,
        volumes: Callable[[], dict[str, Volume]],
        registry: Registry,
        pool_name: str,
        nursery: trio.Nursery,
        open_device: Callable[[str], Device] = FileDevice,
    ) -> None:
        self.pool = pool
        self.open_device = open_device  # the daemon's, so new disks can take injected faults
        self.registry = registry
        self.pool_name = pool_name  # the registered name (may differ from the labels')
        self.nursery = nursery
        self.rebuilder = Rebuilder(pool, volumes)
        self.rate_limit = 0

    # ---- operations -----------------------------------------------------------------

    async def add(self, paths: list[str], media: str | None, force: bool) -> list[int]:
        disks = check_new_disks(paths, media=media, slab_size=self.pool.slab_size,
                                meta_slot_size=self.pool.metadata.meta_slot_size, force=force)
        added = []
        for disk in disks:
            device = self.open_device(disk.path)
            try:
                member = await self.pool.add_disk(device, disk.media)
            except BaseException:
                device.close()
                raise
            added.append(member.record.disk_id)
            self._register_paths()
        return added

    async def retire(self, name: str, *, remove: bool) -> dict[str, Any]:
        disk_id = self.pool.find_disk(name)
        self._idle_or_refuse()
        state = self.pool.disks[disk_id].record.state
        if state == "retired" and not remove:
            raise InvalidInput(f"disk {disk_id} is already retired")
        moves = plan_moves(self.pool, {disk_id})
        check_moves_sources(self.pool, moves)
        check_moves_fit(self.pool, moves)
        if state == "online":
            await self.pool.set_state(disk_id, "retiring", "retired by the user")

        async def finish() -> None:
            if self.pool.extents_on(disk_id):
                return  # some moves failed: it keeps what is left, and says so
            if remove:
                await self.pool.remove_disk(disk_id)
                self._register_paths()
            else:
                await self.pool.set_state(disk_id, "retired", "evacuated")

        verb = "remove" if remove else "retire"
        return await self._start(moves, f"{verb} disk {disk_id}", finish)

    async def replace(
        self, old_name: str, new_path: str, media: str | None, force: bool
    ) -> dict[str, Any]:
        old_id = self.pool.find_disk(old_name)
        self._idle_or_refuse()
        old = self.pool.disks[old_id]
        new = check_new_disks([new_path], media=media or old.record.media,
                              slab_size=self.pool.slab_size,
                              meta_slot_size=self.pool.metadata.meta_slot_size, force=force)[0]
        from blockspace.ondisk.label import compute_geometry

        geometry = compute_geometry(new.size, self.pool.slab_size,
                                    self.pool.metadata.meta_slot_size)
        check_moves_sources(self.pool, plan_moves(self.pool, {old_id}))
        needed = self.pool.extents_on(old_id)
        if geometry.extent_count < needed:
            raise NoSpace(
                f"{new_path} is too small to replace disk {old_id}: it holds "
                f"{geometry.extent_count} extents, disk {old_id} has {needed} in use"
            )
        new_id = (await self.add([new_path], new.media, force))[0]
        if old.record.state == "online":
            await self.pool.set_state(old_id, "retiring", f"being replaced by disk {new_id}")
        moves = plan_moves(self.pool, {old_id})

        async def finish() -> None:
            if not self.pool.extents_on(old_id):
                await self.pool.remove_disk(old_id)
                self._register_paths()

        return await self._start(moves, f"replace disk {old_id} by disk {new_id}", finish,
                                 prefer=new_id)

    async def repair(self) -> dict[str, Any]:
        """Rebuild the extents of failed, missing and retiring disks onto free space."""
        self._idle_or_refuse()
        sources = {d for d, disk in self.pool.disks.items()
                   if disk.record.state in EVACUATE_STATES and self.pool.extents_on(d)}
        if not sources:
            return self.rebuilder.progress.to_dict() | {"state": "done", "total": 0}
        moves = plan_moves(self.pool, sources)
        check_moves_sources(self.pool, moves)
        check_moves_fit(self.pool, moves)

        async def finish() -> None:
            for disk_id in sources:
                disk = self.pool.disks.get(disk_id)
                if disk is not None and disk.record.state == "retiring" and not \
                        self.pool.extents_on(disk_id):
                    await self.pool.set_state(disk_id, "retired", "evacuated")

        names = ", ".join(str(d) for d in sorted(sources))
        return await self._start(moves, f"repair (disks {names})", finish)

    async def online(self, names: list[str], path: str | None = None) -> dict[str, Any]:
        """Re-admit failed or missing disks that are back (the same disks, labels intact),
        resyncing only what they missed (blockspace/repair/readmit.py). Several at once come back
        in the order they left, the last first: it holds the newest data of the slabs
        they share."""
        ids = sorted({self.pool.find_disk(name) for name in names})
        if path is not None and len(ids) != 1:
            raise InvalidInput("--path needs exactly one disk")
        self._idle_or_refuse()
        for disk_id in ids:
            state = self.pool.disks[disk_id].record.state
            if state not in RETURNING_STATES:
                raise InvalidInput(f"disk {disk_id} is {state}, not failed or missing")
        check_return_order(self.pool, ids)
        prepared: list[int] = []
        try:
            for disk_id in returning_order(self.pool, ids):
                await self._prepare_one(disk_id, path)
                prepared.append(disk_id)
        finally:
            if prepared:
                await self._start_resync(prepared)
        return self.rebuilder.progress.to_dict()

    async def _prepare_one(self, disk_id: int, path: str | None) -> None:
        disk = self.pool.disks[disk_id]
        device = disk.returned if path is None else None
        opened = device is None  # ours to close if it does not come back
        if device is None:
            try:
                device = self.open_device(path or disk.path)
            except BlockspaceError as error:
                raise InvalidInput(f"disk {disk_id} cannot be opened: {error}") from None
        try:
            await prepare(self.pool, disk_id, device)
        except BaseException as error:
            if opened:
                device.close()
            if isinstance(error, DeviceError):
                raise DeviceError(f"disk {disk_id} cannot come back online: {error}") from None
            raise

    async def _start_resync(self, disk_ids: list[int]) -> dict[str, Any]:
        async def work(progress: RebuildProgress) -> None:
            await catch_up_disks(self.pool, self.rebuilder.volumes(), disk_ids, progress)

        self.rebuilder.finished = trio.Event()
        self.rebuilder.progress.state = "running"
        reason = f"resync disk{'s' if len(disk_ids) > 1 else ''} " + ", ".join(map(str, disk_ids))
        self.rebuilder.progress.reason = reason
        self.nursery.start_soon(self.rebuilder.run_task, reason, work)
        await trio.lowlevel.checkpoint()
        return self.rebuilder.progress.to_dict()

    async def resume(self) -> None:
        """At mount: finish an interrupted resync, take back disks found missing at the last
        mount that are present again (a failed disk waits for `disk online`)."""
        resyncing = [d for d, disk in self.pool.disks.items()
                     if disk.record.state == "resyncing" and disk.device is not None]
        if resyncing:
            await self._start_resync(returning_order(self.pool, resyncing))
        back = [d for d, disk in self.pool.disks.items()
                if disk.returned is not None and disk.record.state == "missing"]
        if back:
            await self.rebuilder.finished.wait()
            try:
                await self.online([str(d) for d in back])
            except BlockspaceError as error:
                log.error("disks %s are back but cannot be re-admitted: %s", back, error)
        for disk_id, disk in sorted(self.pool.disks.items()):
            if disk.returned is not None and disk.record.state == "failed":
                log.warning("disk %d (%s) is present but failed: `blockspace disk online` "
                            "re-admits it", disk_id, disk.path)

    async def rebalance(self) -> dict[str, Any]:
        """Spread extents evenly over the online disks (after adding disks)."""
        self._idle_or_refuse()
        moves = plan_rebalance(self.pool)

        async def finish() -> None:
            return None

        return await self._start(moves, "rebalance", finish, evacuate=False)

    def auto_repair(self, disk_id: int) -> None:
        """A disk just failed: rebuild its extents onto free space if there is room."""
        self.nursery.start_soon(self._auto_repair, disk_id)

    async def _auto_repair(self, disk_id: int) -> None:
        await self.rebuilder.finished.wait()
        try:
            await self.repair()
        except NoSpace as error:
            log.warning("disk %d failed and cannot be repaired yet: %s", disk_id, error)
        except BlockspaceError as error:
            log.error("automatic repair after disk %d failed: %s", disk_id, error)

    # ---- plumbing -------------------------------------------------------------------

    def _idle_or_refuse(self) -> None:
        if self.rebuilder.active:
            raise BlockspaceError(
                f"a rebuild is running ({self.rebuilder.progress.reason}); wait for it "
                "(`pool status` shows its progress)"
            )

    async def _start(
        self, moves: list[Move], reason: str, finish: Callable[[], Any], *,
        prefer: int | None = None, evacuate: bool = True,
    ) -> dict[str, Any]:
        sources = {move.disk_id for move in moves}

        def replan() -> list[Move]:  # what is still (or newly) on the disks being emptied
            return plan_moves(self.pool, sources & set(self.pool.disks))

        async def run() -> None:
            await self.rebuilder.run(moves, reason, prefer=prefer, rate_limit=self.rate_limit,
                                     after=finish, replan=replan if evacuate else None)

        self.rebuilder.finished = trio.Event()  # active from now, even before the task runs
        self.rebuilder.progress.state = "running"
        self.rebuilder.progress.reason = reason
        self.nursery.start_soon(run)
        await trio.lowlevel.checkpoint()
        return self.rebuilder.progress.to_dict()

    def _register_paths(self) -> None:
        entry = self.registry.pools().get(self.pool_name)
        if entry is None:
            return
        paths = [os.path.abspath(disk.path) for disk in self.pool.disks.values()]
        self.registry.add(PoolEntry(entry.name, entry.uuid, paths))
