"""The tier optimizer of one tiered volume: a background task that destages dirty units
and moves units between the tiers by heat, on a schedule and on demand.

Each pass: destage every dirty unit not written in the last `settle` seconds (write-back
volumes), then plan (`tier_plan.plan_moves`: pins first, hysteresis, at most `max_moves`)
and run the demotions, then the promotions. Moves run one at a time, paced to `rate` bytes
per second; a failed move is counted and logged and the pass goes on. A separate loop
destages dirty units as they settle, so written data reaches its parity home without
waiting for the next pass.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import trio

from blockspace.errors import BlockspaceError
from blockspace.tiering.plan import Plan, plan_moves
from blockspace.tiering.tiered_volume import TieredVolume, pinned_tier

log = logging.getLogger(__name__)

DEFAULT_INTERVAL = 300.0  # seconds between scheduled passes
DEFAULT_RATE = 64 << 20  # bytes per second moved between tiers
DEFAULT_MAX_MOVES = 4096  # moves per pass
SETTLE = 1.0  # a dirty unit is destaged once not written for this long
HEAT_SAVE_INTERVAL = 60.0  # heat is saved this often between passes (a crash loses less)
PARALLEL_MOVES = 16  # moves in flight at once (each locks its own unit; commits are shared)


@dataclass
class PassReport:
    started: float = 0.0
    finished: float = 0.0
    promoted: int = 0
    demoted: int = 0
    destaged: int = 0
    failed: int = 0
    planned: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class TierOptimizer:
    def __init__(
        self,
        volume: TieredVolume,
        *,
        interval: float = DEFAULT_INTERVAL,
        rate: int = DEFAULT_RATE,
        max_moves: int = DEFAULT_MAX_MOVES,
        save_heat: Callable[[TieredVolume], None] | None = None,
    ) -> None:
        self.volume = volume
        self.interval = interval
        self.rate = rate
        self.max_moves = max_moves
        self.save_heat = save_heat
        self.passes = 0
        self.state = "idle"
        self.last = PassReport()
        self._lock = trio.Lock()
        self._wake = trio.Event()
        self._pace = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "passes": self.passes,
            "interval": self.interval,
            "rate": self.rate,
            "max_moves": self.max_moves,
            "last_pass": self.last.to_dict(),
        }

    # ---- the background tasks -----------------------------------------------------

    async def run(self) -> None:
        """Scheduled passes, forever (cancelled with the daemon's nursery); the heat is
        saved after each pass and every HEAT_SAVE_INTERVAL seconds between them."""
        next_pass = trio.current_time() + self.interval
        while True:
            with trio.move_on_at(min(next_pass, trio.current_time() + HEAT_SAVE_INTERVAL)):
                await self._wake.wait()
            if self._wake.is_set() or trio.current_time() >= next_pass:
                self._wake = trio.Event()
                await self.optimize()
                next_pass = trio.current_time() + self.interval
            elif self.save_heat is not None:
                self.save_heat(self.volume)

    async def run_destager(self) -> None:
        """Destage dirty units once they settle (write-back volumes)."""
        volume = self.volume
        while True:
            await volume.dirty_changed.wait()
            volume.dirty_changed = trio.Event()
            await trio.sleep(SETTLE)
            while volume.dirty_units():
                settled = await self._destage(volume.dirty_units(), PassReport(), settle=SETTLE)
                if not settled:
                    await trio.sleep(SETTLE / 2)

    # ---- one pass -------------------------------------------------------------------

    def plan(self) -> Plan:
        volume = self.volume
        heat = volume.heat.snapshot()
        resident = set(volume.map)
        pins = volume.tiers.pins
        pinned_ssd = {
            u for offset, length, tier in pins if tier == "ssd"
            for u in range(offset // volume.unit, (offset + length - 1) // volume.unit + 1)
        }
        pinned_hdd = {
            u for u in resident | set(heat) if pinned_tier(pins, u, volume.unit) == "hdd"
        }
        return plan_moves(heat, resident, volume.slots, pinned_ssd=pinned_ssd,
                          pinned_hdd=pinned_hdd, max_moves=self.max_moves)

    async def optimize(self) -> PassReport:
        """One pass now (waits for a running one to finish first)."""
        async with self._lock:
            self.state = "running"
            report = PassReport(started=time.time())
            try:
                volume = self.volume
                if volume.write_back:
                    await self._destage(volume.dirty_units(), report, settle=0.0)
                plan = self.plan()
                report.planned = plan.moves
                # Demotions first: they free the slots the promotions take.
                await self._parallel(volume.demote, plan.demote, report, "demoted")
                await self._parallel(volume.promote, plan.promote, report, "promoted")
            finally:
                report.finished = time.time()
                self.last = report
                self.passes += 1
                self.state = "idle"
                if self.save_heat is not None:
                    self.save_heat(self.volume)
            if plan.moves:
                log.info("volume %s: tier pass promoted %d, demoted %d, destaged %d, "
                         "failed %d", volume.name, report.promoted, report.demoted,
                         report.destaged, report.failed)
            return report

    @asynccontextmanager
    async def paused(self) -> AsyncIterator[None]:
        """No pass runs inside (one running is waited for)."""
        async with self._lock:
            yield

    def wake(self) -> None:
        self._wake.set()

    async def _parallel(self, op: Callable[[int], Any], units: list[int], report: PassReport,
                        field: str) -> None:
        limiter = trio.CapacityLimiter(PARALLEL_MOVES)

        async def one(unit: int) -> None:
            async with limiter:
                if await self._move(op, unit, report):
                    setattr(report, field, getattr(report, field) + 1)

        async with trio.open_nursery() as nursery:
            for unit in units:
                nursery.start_soon(one, unit)

    async def _destage(self, units: list[int], report: PassReport, *, settle: float) -> int:
        now = time.monotonic()
        ready = [u for u in units
                 if not settle or now - self.volume.last_write.get(u, -math.inf) >= settle]
        await self._parallel(self.volume.destage, ready, report, "destaged")
        return len(ready)

    async def _move(self, op: Callable[[int], Any], unit: int, report: PassReport) -> bool:
        if self.rate:
            start = max(trio.current_time(), self._pace)
            self._pace = start + self.volume.unit / self.rate
            await trio.sleep_until(start)
        try:
            return bool(await op(unit))
        except BlockspaceError as error:
            report.failed += 1
            self.volume.counters.failed_moves += 1
            log.error("volume %s: moving unit %d failed: %s", self.volume.name, unit, error)
            return False
