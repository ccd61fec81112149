"""Disk management: add, retire, remove, replace, and repair onto free space.

Shared by the daemon (online, rebuilds in its nursery) and the CLI on an unmounted pool
(same code, run to completion in the CLI process). Every operation checks that it can
finish (free space, disk sizes, state) before it changes anything.

A job that moves extents (retire, remove, replace, repair, rebalance) is recorded in the
state directory while it runs (`Registry.save_job_state`): a daemon killed in the middle
resumes it at the next mount (`resume`). Asking again for the job that is running joins
it; another disk operation is refused until it ends or is cancelled (`cancel`); its rate
can be changed while it runs (`set_rate`).
"""

import logging
import os
from collections.abc import Callable
from typing import Any

import trio

from blockspace.admin.pools import check_new_disks, disk_identity
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
    check_rate,
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
        self.job: dict[str, Any] | None = None  # the record of the extent job running
        self._job_scope: trio.CancelScope | None = None
        self._job_stopped = trio.Event()  # the job task ended (its wrap-up included)
        self._job_stopped.set()
        self._cancelled = False

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
        job: dict[str, Any] = {"op": "remove" if remove else "retire", "disk": disk_id}
        joined = self._join(job)
        if joined is not None:
            return joined
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
        return await self._start(moves, f"{verb} disk {disk_id}", finish, job=job)

    async def replace(
        self, old_name: str, new_path: str, media: str | None, force: bool
    ) -> dict[str, Any]:
        old_id = self.pool.find_disk(old_name)
        member = self._member_at(new_path)
        if member is not None:
            # Asked again (after a restart, or while it runs): the new disk is a member
            # already, and open (locked) in this process.
            if member == old_id or not self._may_replace_onto(old_id, member):
                raise InvalidInput(f"{new_path} is already disk {member} of pool "
                                   f"{self.pool_name!r}")
            joined = self._join({"op": "replace", "disk": old_id, "new": member})
            if joined is not None:
                return joined
            self._idle_or_refuse()
            check_moves_sources(self.pool, plan_moves(self.pool, {old_id}))
            return await self._replace_onto(old_id, member)
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
        return await self._replace_onto(old_id, new_id)

    async def _replace_onto(self, old_id: int, new_id: int) -> dict[str, Any]:
        job = {"op": "replace", "disk": old_id, "new": new_id}
        self._save_job(job)  # before the first change of state: a restart finds it
        if self.pool.disks[old_id].record.state == "online":
            await self.pool.set_state(old_id, "retiring", f"being replaced by disk {new_id}")
        moves = plan_moves(self.pool, {old_id})

        async def finish() -> None:
            if not self.pool.extents_on(old_id):
                await self.pool.remove_disk(old_id)
                self._register_paths()

        return await self._start(moves, f"replace disk {old_id} by disk {new_id}", finish,
                                 prefer=new_id, job=job)

    def _member_at(self, path: str) -> int | None:
        """The disk of this pool that `path` is (the same file or block device), if any."""
        try:
            wanted = disk_identity(path)
        except OSError:
            return None
        for disk_id, disk in self.pool.disks.items():
            try:
                if disk_identity(disk.path) == wanted:
                    return disk_id
            except OSError:
                continue
        return None

    def _may_replace_onto(self, old_id: int, new_id: int) -> bool:
        """Whether member `new_id` is (or may become) the replacement of `old_id`: the one
        an interrupted replace recorded, or an empty disk in service."""
        recorded = self.registry.job_state(self.pool_name) or self.job or {}
        if recorded.get("op") == "replace" and recorded.get("disk") == old_id \
                and recorded.get("new") == new_id:
            return True
        old = self.pool.disks[old_id].record
        if old.state_reason == f"being replaced by disk {new_id}":
            return True
        new = self.pool.disks[new_id]
        return new.allocatable and not self.pool.extents_on(new_id)

    async def repair(self) -> dict[str, Any]:
        """Rebuild the extents of failed, missing and retiring disks onto free space."""
        joined = self._join({"op": "repair"})
        if joined is not None:
            return joined
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
        return await self._start(moves, f"repair (disks {names})", finish, job={"op": "repair"})

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
        job = self.registry.job_state(self.pool_name)
        if job is not None:
            await self.rebuilder.finished.wait()
            await self.resume_job(job)

    async def resume_job(self, job: dict[str, Any]) -> None:
        """Carry on with the extent job a stop interrupted (`job`: its record), planned
        afresh from the map: what moved before the stop stays moved."""
        op, disk_id, new_id = job.get("op"), job.get("disk"), job.get("new")
        try:
            self.rate_limit = check_rate(int(job.get("rate") or 0))
        except (InvalidInput, TypeError, ValueError):
            self.rate_limit = 0
        log.info("resuming the %s interrupted by the last stop", job.get("reason", op))
        try:
            if op in ("retire", "remove") and isinstance(disk_id, int):
                state = self.pool.disks[disk_id].record.state if disk_id in self.pool.disks \
                    else None
                if state is None or (op == "retire" and state == "retired"):
                    self._clear_job()  # it had finished: only the record was left
                    return
                await self.retire(str(disk_id), remove=op == "remove")
            elif op == "replace" and isinstance(disk_id, int) and isinstance(new_id, int):
                if disk_id not in self.pool.disks or new_id not in self.pool.disks:
                    self._clear_job()
                    return
                check_moves_sources(self.pool, plan_moves(self.pool, {disk_id}))
                await self._replace_onto(disk_id, new_id)
            elif op == "repair":
                await self.repair()
            elif op == "rebalance":
                await self.rebalance()
            else:
                log.error("ignoring an unknown interrupted disk job: %s", job)
                self._clear_job()
        except BlockspaceError as error:
            log.error("the interrupted %s cannot resume: %s", job.get("reason", op), error)

    async def rebalance(self) -> dict[str, Any]:
        """Spread extents evenly over the online disks (after adding disks)."""
        joined = self._join({"op": "rebalance"})
        if joined is not None:
            return joined
        self._idle_or_refuse()
        moves = plan_rebalance(self.pool)

        async def finish() -> None:
            return None

        return await self._start(moves, "rebalance", finish, evacuate=False,
                                 job={"op": "rebalance"})

    # ---- the running job: cancel, rate ------------------------------------------------

    async def cancel(self) -> dict[str, Any]:
        """Stop the running extent job between moves (a move under way is abandoned
        before its commit, or finishes it: the map is never half switched). The disks keep
        their states, each saying what is left; the job does not resume at the next mount."""
        scope = self._job_scope
        if scope is None or not self.rebuilder.active:
            raise InvalidInput("no rebuild is running (a disk's resync cannot be cancelled)"
                               if self.rebuilder.active else "no rebuild is running")
        self._cancelled = True
        scope.cancel()
        await self._job_stopped.wait()
        return self.rebuilder.progress.to_dict()

    def set_rate(self, rate: int) -> dict[str, Any]:
        """The bandwidth limit of the running job (and of the next), at once."""
        self.rate_limit = check_rate(rate)
        if self.rebuilder.active:
            self.rebuilder.set_rate(self.rate_limit)
            if self.job is not None:
                self.job["rate"] = self.rate_limit
                self._save_job(self.job)
        return self.rebuilder.progress.to_dict()

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
            progress = self.rebuilder.progress.to_dict()
            raise BlockspaceError(
                f"a rebuild is running ({progress['reason']}, {progress['percent']:.0f}% done): "
                f"cancel it (`blockspace disk rebuild {self.pool_name} --cancel`) or wait "
                "(`pool status` shows its progress)"
            )

    def _join(self, job: dict[str, Any]) -> dict[str, Any] | None:
        """The running job's progress when it is the one asked for again, else None."""
        running = self.job
        if not self.rebuilder.active or running is None:
            return None
        if any(running.get(key) != value for key, value in job.items()):
            return None
        log.info("%s asked again: it is running, joined", running.get("reason"))
        return self.rebuilder.progress.to_dict()

    def _save_job(self, job: dict[str, Any]) -> None:
        self.registry.save_job_state(self.pool_name, job)

    def _clear_job(self) -> None:
        self.registry.clear_job_state(self.pool_name)

    async def _start(
        self, moves: list[Move], reason: str, finish: Callable[[], Any], *,
        prefer: int | None = None, evacuate: bool = True, job: dict[str, Any],
    ) -> dict[str, Any]:
        sources = {move.disk_id for move in moves}
        job = dict(job, reason=reason, rate=self.rate_limit)
        self._save_job(job)  # from now a restart resumes it
        self.job = job
        self._cancelled = False
        self._job_stopped = stopped = trio.Event()
        # Made here, entered by the task: a cancel before the task first runs still counts.
        self._job_scope = scope = trio.CancelScope()

        def replan() -> list[Move]:  # what is still (or newly) on the disks being emptied
            return plan_moves(self.pool, sources & set(self.pool.disks))

        async def run() -> None:
            try:
                with scope:
                    await self.rebuilder.run(
                        moves, reason, prefer=prefer, rate_limit=self.rate_limit,
                        after=finish, replan=replan if evacuate else None)
                # Not reached when the daemon stops (its cancel goes on up): the record
                # stays, and the next mount resumes the job.
                if self._cancelled:
                    await self._note_cancelled(sources)
                if self._cancelled or self.rebuilder.progress.state == "done":
                    self._clear_job()
            finally:
                if not self.rebuilder.finished.is_set():  # cancelled before it began
                    self.rebuilder.progress.state = "cancelled"
                    self.rebuilder.finished.set()
                self._job_scope = None
                self.job = None
                stopped.set()

        self.rebuilder.finished = trio.Event()  # active from now, even before the task runs
        self.rebuilder.progress.state = "running"
        self.rebuilder.progress.reason = reason
        self.rebuilder.progress.rate_limit = self.rate_limit
        self.nursery.start_soon(run)
        await trio.lowlevel.checkpoint()
        return self.rebuilder.progress.to_dict()

    async def _note_cancelled(self, sources: set[int]) -> None:
        """After a cancel, each disk being emptied says so, and what is left on it."""
        self.rebuilder.progress.state = "cancelled"
        for disk_id in sorted(sources):
            disk = self.pool.disks.get(disk_id)
            if disk is None or disk.record.state != "retiring":
                continue
            left = self.pool.extents_on(disk_id)
            reason = (f"{self.rebuilder.progress.reason} cancelled with {left} extents left "
                      "on it: run it again to finish")
            try:
                await self.pool.set_state(disk_id, "retiring", reason)
            except BlockspaceError as error:
                log.error("disk %d: could not record the cancel: %s", disk_id, error)

    def _register_paths(self) -> None:
        entry = self.registry.pools().get(self.pool_name)
        if entry is None:
            return
        paths = [os.path.abspath(disk.path) for disk in self.pool.disks.values()]
        self.registry.add(PoolEntry(entry.name, entry.uuid, paths))
