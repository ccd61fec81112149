"""The daemon's side of tiering: which volumes are tiered, their optimizer tasks, heat
saved in the state directory, and the `tier_*` control requests.

The engine volumes (`Daemon.volumes`: every untiered volume record, hidden tiers included)
stay what scrub, repair and rebuild work on; the FUSE adapter serves `served()`: untiered
volumes that are nobody's tier, plus the tiered volumes.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import trio

from blockspace.errors import InvalidInput
from blockspace.pool.pool import Pool
from blockspace.tiering import admin as tier_admin
from blockspace.tiering.heat import HeatMap
from blockspace.tiering.optimizer import DEFAULT_INTERVAL, DEFAULT_RATE, TierOptimizer
from blockspace.tiering.tiered_volume import TieredVolume
from blockspace.volume.volume import Volume

log = logging.getLogger(__name__)


class TierService:
    def __init__(self, pool: Pool, volumes: dict[str, Volume], state_dir: Path,
                 pool_name: str, *, period: float = DEFAULT_INTERVAL,
                 rate: int = DEFAULT_RATE) -> None:
        self.pool = pool
        self.period = period  # each optimizer's pass interval and move rate ([tier] config)
        self.rate = rate
        self.volumes = volumes  # the daemon's engine volumes (shared, kept up to date)
        self.state_dir = state_dir
        self.pool_name = pool_name
        self.tiered: dict[str, TieredVolume] = {}
        self.optimizers: dict[str, TierOptimizer] = {}
        self._scopes: dict[str, trio.CancelScope] = {}
        self._stopped: dict[str, trio.Event] = {}
        self._nursery: trio.Nursery | None = None
        for record in pool.metadata.volumes:
            if record.tiers is not None:
                self._add(record.name)

    def _add(self, name: str) -> TieredVolume:
        record = self.pool.metadata.volume(name)
        tiers = record.tiers
        assert tiers is not None
        heat = HeatMap(record.size // tiers.unit)
        tier_admin.load_heat(self._heat_path(name), heat)
        volume = TieredVolume(self.pool, record, self.volumes[tiers.ssd],
                              self.volumes[tiers.hdd], heat)
        self.tiered[name] = volume
        self.optimizers[name] = TierOptimizer(volume, interval=self.period, rate=self.rate,
                                              save_heat=self._save_heat)
        if self._nursery is not None:
            self._start(name)
        return volume

    def _heat_path(self, name: str) -> Path:
        return tier_admin.heat_path(self.state_dir, self.pool_name, name)

    def _save_heat(self, volume: TieredVolume) -> None:
        try:
            tier_admin.save_heat(self._heat_path(volume.name), volume.heat)
        except OSError as error:
            log.warning("could not save the heat of %s: %s", volume.name, error)

    def save_all(self) -> None:
        for volume in self.tiered.values():
            self._save_heat(volume)

    def served(self) -> dict[str, Volume | TieredVolume]:
        if not self.tiered:  # called on every request: no copy when nothing is hidden
            return self.volumes  # type: ignore[return-value]
        hidden = {n for t in self.tiered.values() for n in (t.tiers.ssd, t.tiers.hdd)}
        result: dict[str, Volume | TieredVolume] = {
            name: volume for name, volume in self.volumes.items() if name not in hidden
        }
        result.update(self.tiered)
        return result

    # ---- background tasks ------------------------------------------------------------

    def start(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        for name in self.tiered:
            self._start(name)

    def _start(self, name: str) -> None:
        assert self._nursery is not None
        scope = self._scopes[name] = trio.CancelScope()
        stopped = self._stopped[name] = trio.Event()
        optimizer = self.optimizers[name]

        async def run() -> None:
            try:
                with scope:
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(optimizer.run)
                        nursery.start_soon(optimizer.run_destager)
            finally:
                stopped.set()

        self._nursery.start_soon(run)

    # ---- volumes ----------------------------------------------------------------------

    async def create(self, request: dict[str, Any]) -> TieredVolume:
        specs = [tier_admin.parse_tier(str(text)) for text in request["tiers"]]
        unit = request.get("tier_unit")
        interleave = request.get("interleave")
        record = await tier_admin.create_tiered(
            self.pool, str(request["name"]), specs,
            provisioning=str(request.get("provisioning") or "thin"),
            unit=int(unit) if unit else None, interleave=int(interleave) if interleave else None,
        )
        tiers = record.tiers
        assert tiers is not None
        for sub in (tiers.ssd, tiers.hdd):
            self.volumes[sub] = Volume(self.pool, self.pool.metadata.volume(sub))
        return self._add(record.name)

    async def delete(self, name: str) -> None:
        record = self.pool.volume(name)
        if record.tiers is None:
            await tier_admin.delete_volume(self.pool, name)  # refuses a tier alone
            self.volumes.pop(name, None)
            return
        # No move may still be writing into the tiers once their extents are freed.
        scope = self._scopes.pop(name, None)
        if scope is not None:
            scope.cancel()
            await self._stopped.pop(name).wait()
        try:
            async with self.optimizers[name].paused():  # and no pass asked for on demand
                await tier_admin.delete_volume(self.pool, name)
        except BaseException:
            if self._nursery is not None:
                self._start(name)  # still there: keep optimizing it
            raise
        self.tiered.pop(name, None)
        self.optimizers.pop(name, None)
        self.volumes.pop(record.tiers.ssd, None)
        self.volumes.pop(record.tiers.hdd, None)

    # ---- control requests ---------------------------------------------------------------

    def _volume(self, request: dict[str, Any]) -> TieredVolume:
        name = request.get("volume")
        if not isinstance(name, str):
            raise InvalidInput("name a tiered volume")
        volume = self.tiered.get(name)
        if volume is None:
            self.pool.volume(name)  # "no volume X" when there is none
            raise InvalidInput(f"volume {name!r} is not tiered")
        return volume

    def status(self, volume: TieredVolume) -> dict[str, Any]:
        counters = dict(volume.counters.__dict__)
        live = {
            "counters": counters,
            "optimizer": self.optimizers[volume.name].to_dict(),
            "mounted": True,
        }
        return tier_admin.volume_status(self.pool, volume.record, volume.heat, live)

    async def handle(self, op: str, request: dict[str, Any]) -> Any:
        if op == "tier_status":
            if request.get("volume") is None:
                return [self.status(v) for _, v in sorted(self.tiered.items())]
            return [self.status(self._volume(request))]
        volume = self._volume(request)
        if op == "tier_optimize":
            optimizer = self.optimizers[volume.name]
            if request.get("rate") is not None:
                optimizer.rate = int(request["rate"])
            report = await optimizer.optimize()
            return report.to_dict() | {"status": self.status(volume)}
        if op == "tier_pin":
            length = request.get("length")
            await tier_admin.pin(self.pool, volume.name, int(request.get("offset") or 0),
                                 int(length) if length is not None else None,
                                 str(request.get("tier")))
            return self.status(volume)
        if op == "tier_unpin":
            length = request.get("length")
            removed = await tier_admin.unpin(self.pool, volume.name,
                                             int(request.get("offset") or 0),
                                             int(length) if length is not None else None)
            return self.status(volume) | {"removed": removed}
        raise InvalidInput(f"unknown request {op!r}")
