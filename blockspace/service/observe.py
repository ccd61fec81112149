"""What the daemon tells the outside about itself: the event bus (log and hooks), the I/O
counters, the `iostat` and `volume_show` requests, the Prometheus endpoint, and a watcher
that turns progress and fullness changes into events (rebuild and scrub start/finish,
thresholds crossed). Kept here, beside the daemon, so the daemon only wires it in."""

import errno
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import trio

from blockspace.admin.placement import placement
from blockspace.errors import InvalidInput
from blockspace.events.bus import EventBus, crossed
from blockspace.events.log import EventLog, events_path
from blockspace.pool.pool import Pool
from blockspace.service import iostat
from blockspace.service.iostats import IoStats
from blockspace.service.metrics import MetricsServer
from blockspace.service.metrics_address import parse_metrics_address

log = logging.getLogger(__name__)

WATCH_INTERVAL = 0.5  # seconds between looks at rebuild/scrub progress and fullness
THRESHOLDS = (80.0, 90.0, 95.0)  # percent of the pool's raw space allocated (the default)
ERROR_EVENT_INTERVAL = 60.0  # at most one io_error/enospc event per volume per minute
TERMINAL = ("done", "failed", "cancelled")
REQUESTS = ("iostat", "volume_show")


@dataclass
class Sources:
    """What the observer reads, as the daemon has it."""

    pool: Pool
    pool_name: str
    mountpoint: str
    rebuild: Callable[[], dict[str, Any] | None]
    scrub: Callable[[], dict[str, Any]]
    tiers: Callable[[], dict[str, Any]]  # name -> TieredVolume (its `counters`)


def progress_events(work: str, seen: dict[str, float], progress: dict[str, Any] | None
                    ) -> list[tuple[str, dict[str, Any]]]:
    """The start and finish events of a rebuild or scrub since `seen` (its last start and
    finish times, updated). Times, not states: a run that started and finished between two
    looks still gives both events."""
    if not progress:
        return []
    found: list[tuple[str, dict[str, Any]]] = []
    started = float(progress.get("started") or 0.0)
    finished = float(progress.get("finished") or 0.0)
    if started and started != seen.get("started"):
        seen["started"] = started
        key = "reason" if work == "rebuild" else "volume"
        found.append((f"{work}_start", {key: progress.get(key)}))
    if progress.get("state") in TERMINAL and finished and finished != seen.get("finished"):
        seen["finished"] = finished
        fields: dict[str, Any] = {"result": progress.get("state"),
                                  "seconds": round(finished - started, 3) if started else None}
        if work == "rebuild":
            fields.update(reason=progress.get("reason"), moved=progress.get("done"),
                          failed=progress.get("failed"), bytes=progress.get("bytes_moved"))
        else:
            report = progress.get("report") or {}
            fields.update(volume=progress.get("volume"), bytes=progress.get("bytes_checked"),
                          repaired=report.get("repaired_blocks"),
                          unrecoverable=len(report.get("unrecoverable") or []),
                          error=progress.get("error") or None)
        found.append((f"{work}_finish", fields))
    return found


def fullness(capacity: dict[str, int]) -> float:
    raw = capacity["raw_bytes"]
    return 100.0 * capacity["allocated_bytes"] / raw if raw else math.nan


class Observer:
    def __init__(self, sources: Sources, state_root: Path, *, hooks: Path | None,
                 metrics: str = "", pool_full_percent: float = THRESHOLDS[0]) -> None:
        self.sources = sources
        # The configured warning level (blockspace.toml [thresholds]) and the fixed ones above.
        self.thresholds = tuple(sorted({float(pool_full_percent),
                                        *(t for t in THRESHOLDS[1:] if t > pool_full_percent)}))
        self.io = IoStats()
        self.bus = EventBus(sources.pool_name, EventLog(events_path(state_root,
                                                                    sources.pool_name)), hooks)
        self.metrics = MetricsServer(parse_metrics_address(metrics), self._snapshot_threadsafe
                                     ) if metrics else None
        self._token: trio.lowlevel.TrioToken | None = None
        self._last_error: dict[tuple[str, str], float] = {}
        self._suppressed: dict[tuple[str, str], int] = {}

    # ---- life ------------------------------------------------------------------------

    async def start(self, nursery: trio.Nursery) -> None:
        self._token = trio.lowlevel.current_trio_token()
        await nursery.start(self.bus.run)
        self.sources.pool.on_event = self.bus.emit
        if self.metrics is not None:
            self.metrics.start()
        nursery.start_soon(self._watch)

    def mounted(self, health: str) -> None:
        pool = self.sources.pool
        out = sum(1 for d in pool.disks.values() if d.record.state != "online")
        self.bus.emit("mount", mountpoint=self.sources.mountpoint, health=health,
                      disks=len(pool.disks), disks_not_online=out)

    async def stop(self) -> None:
        """At unmount (shielded by the caller): the last event written, the endpoint shut."""
        self.bus.emit("unmount", mountpoint=self.sources.mountpoint)
        self.sources.pool.on_event = None
        await self.bus.drain()
        if self.metrics is not None:
            await trio.to_thread.run_sync(self.metrics.stop)

    # ---- requests --------------------------------------------------------------------

    def handle(self, op: str, request: dict[str, Any]) -> Any:
        if op == "iostat":
            return self.snapshot()
        if op == "volume_show":
            return placement(self.sources.pool, str(request["name"]),
                             pool_name=self.sources.pool_name,
                             with_map=bool(request.get("map")), mounted=True)
        raise InvalidInput(f"unknown request {op!r}")

    def after(self, op: str, request: dict[str, Any], result: Any) -> None:
        """A control request succeeded: the volume changes are events."""
        if op not in ("volume_create", "volume_grow", "volume_delete"):
            return
        name = str(request.get("name"))
        size = None
        for record in self.sources.pool.metadata.volumes:
            if record.name == name:
                size = record.size
        if op == "volume_delete":
            self.io.forget(name)
        self.bus.emit(op, volume=name, size=size)

    def on_io_error(self, volume: str, op: str, code: int) -> None:
        """A volume request failed (from the FUSE adapter): an event, at most one per volume
        and kind a minute, carrying how many were folded into it."""
        kind = "enospc" if code == errno.ENOSPC else "io_error"
        key = (volume, kind)
        now = time.monotonic()
        last = self._last_error.get(key)
        if last is not None and now - last < ERROR_EVENT_INTERVAL:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return
        self._last_error[key] = now
        self.bus.emit(kind, volume=volume, op=op, errno=code,
                      error=errno.errorcode.get(code, str(code)),
                      suppressed=self._suppressed.pop(key, 0))

    # ---- the snapshot ----------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        s = self.sources
        tiers = {name: asdict(volume.counters) for name, volume in s.tiers().items()}
        return iostat.snapshot(s.pool, self.io, pool_name=s.pool_name, rebuild=s.rebuild(),
                               scrub=s.scrub(), tier_counters=tiers)

    def _snapshot_threadsafe(self) -> dict[str, Any] | None:
        """For the metrics thread: the snapshot, taken on the trio thread."""
        if self._token is None:
            return None
        try:
            return trio.from_thread.run_sync(self.snapshot, trio_token=self._token)
        except trio.RunFinishedError:
            return None

    # ---- the watcher -----------------------------------------------------------------

    async def _watch(self) -> None:
        s = self.sources
        seen: dict[str, dict[str, float]] = {"rebuild": {}, "scrub": {}}
        progress_events("rebuild", seen["rebuild"], s.rebuild())  # what was there before us
        progress_events("scrub", seen["scrub"], s.scrub())
        before = fullness(iostat.capacity(s.pool))
        while True:
            await trio.sleep(WATCH_INTERVAL)
            for work, progress in (("rebuild", s.rebuild()), ("scrub", s.scrub())):
                for event_class, fields in progress_events(work, seen[work], progress):
                    self.bus.emit(event_class, **fields)
            now = fullness(iostat.capacity(s.pool))
            for limit, direction in crossed(self.thresholds, before, now):
                self.bus.emit("threshold", what="allocated", percent=round(now, 1),
                              threshold=limit, direction=direction)
            if math.isfinite(now):
                before = now
