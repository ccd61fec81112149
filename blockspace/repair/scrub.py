"""Scrub: read every allocated block, verify it, compare redundancy, repair what it can.

For each slab, chunk by chunk under the row locks (so foreground writes never race it), the
volume's redundancy checks the chunk (`Redundancy.check`, with the rule of each kind:
mirror.py, parity.py) and repairs with the same routine a read's self-heal uses. A block
no redundancy can vouch for is reported as a volume byte range.

`Scrubber` runs this over a whole pool as a background task: rate-limited, pausable,
cancellable, resumable from a cursor saved every few slabs.
"""

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from blockspace.errors import SlabUnmapped
from blockspace.units import format_size
from blockspace.volume.redundancy import Check
from blockspace.volume.row_locks import column_rows

if TYPE_CHECKING:
    from blockspace.volume.volume import Volume

log = logging.getLogger(__name__)

CHUNK = 1 << 20  # extent bytes verified per lock hold


@dataclass
class ScrubReport:
    bytes_checked: int = 0
    blocks_checked: int = 0
    checksum_errors: int = 0  # blocks that failed their checksum
    mismatches: int = 0  # copies that differ / parity that does not match its data
    repaired_blocks: int = 0
    unrecoverable: list[tuple[str, int, int]] = field(default_factory=list)  # volume, start, len
    labels_repaired: list[str] = field(default_factory=list)  # a label copy rewritten, per disk

    def add(self, other: "ScrubReport") -> None:
        self.bytes_checked += other.bytes_checked
        self.blocks_checked += other.blocks_checked
        self.checksum_errors += other.checksum_errors
        self.mismatches += other.mismatches
        self.repaired_blocks += other.repaired_blocks
        self.unrecoverable.extend(other.unrecoverable)
        self.labels_repaired.extend(other.labels_repaired)

    def add_check(self, volume: "Volume", slab: int, check: Check) -> None:
        """What a check of one chunk of `slab` found; its unrecoverable extent ranges as
        volume byte ranges (adjacent ones joined)."""
        self.bytes_checked += check.bytes_checked
        self.blocks_checked += check.blocks_checked
        self.checksum_errors += check.checksum_errors
        self.mismatches += check.mismatches
        self.repaired_blocks += check.repaired_blocks
        for column, extent_offset, length in check.unrecoverable:
            offset = _volume_offset(volume, slab, column, extent_offset)
            self._add_unrecoverable(volume.name, offset, length)

    def _add_unrecoverable(self, volume: str, offset: int, length: int) -> None:
        if self.unrecoverable:
            name, last_offset, last_length = self.unrecoverable[-1]
            if name == volume and last_offset + last_length == offset:
                self.unrecoverable[-1] = (name, last_offset, last_length + length)
                return
        self.unrecoverable.append((volume, offset, length))

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["unrecoverable"] = [
            {"volume": v, "offset": o, "length": n} for v, o, n in self.unrecoverable
        ]
        return data

    def summary(self) -> str:
        """One readable line for the log: what was checked, found, repaired and lost."""
        line = (f"{format_size(self.bytes_checked)} checked ({self.blocks_checked} blocks), "
                f"{self.checksum_errors} checksum errors, {self.mismatches} mismatches, "
                f"{self.repaired_blocks} blocks repaired, "
                f"{len(self.unrecoverable)} unrecoverable ranges")
        shown = ", ".join(f"{v} at {o} length {n}" for v, o, n in self.unrecoverable[:5])
        more = len(self.unrecoverable) - 5
        return line + (f": {shown}" if shown else "") + (f" and {more} more" if more > 0 else "")


async def scrub_slab(volume: "Volume", slab: int, *, repair: bool = True) -> ScrubReport:
    report = ScrubReport()
    if slab not in volume.record.slabs:
        return report
    slab_size = volume.pool.slab_size
    for start in range(0, slab_size, CHUNK):
        end = min(start + CHUNK, slab_size)
        async with volume.row_locks.hold(column_rows(volume.spec, slab, start, end)):
            try:
                extents = volume.io.current_extents(slab)  # a move may have switched it
            except SlabUnmapped:
                return report  # discarded meanwhile: nothing left to check
            check = await volume.redundancy.check(slab, extents, start, end, repair=repair)
        report.add_check(volume, slab, check)
        await trio.lowlevel.checkpoint()
    for name, offset, length in report.unrecoverable:
        log.warning("scrub: volume %s bytes %d-%d unrecoverable (left as they are)", name,
                    offset, offset + length)
    return report


def _volume_offset(volume: "Volume", slab: int, column: int, extent_offset: int) -> int:
    """Where extent byte `extent_offset` of data column `column` sits in the volume."""
    unit = volume.spec.interleave
    row, within = divmod(extent_offset, unit)
    return slab * volume.slab_data_size + row * unit * volume.spec.columns + column * unit + within


# ---- the background task ----------------------------------------------------------------


@dataclass
class ScrubProgress:
    state: str = "idle"  # idle, running, paused, done, cancelled, failed
    volume: str | None = None  # only this volume, or all
    total_slabs: int = 0
    done_slabs: int = 0
    cursor: list[tuple[str, int]] = field(default_factory=list)  # slabs still to do
    started: float = 0.0
    finished: float = 0.0
    bytes_checked: int = 0
    rate_limit: int = 0  # bytes per second, 0 = unlimited
    report: ScrubReport = field(default_factory=ScrubReport)
    error: str = ""

    def to_dict(self) -> dict[str, Any]:
        elapsed = (self.finished or time.time()) - self.started if self.started else 0.0
        speed = self.bytes_checked / elapsed if elapsed > 0 else 0.0
        remaining = self.total_slabs - self.done_slabs
        per_slab = elapsed / self.done_slabs if self.done_slabs else 0.0
        return {
            "state": self.state,
            "volume": self.volume,
            "total_slabs": self.total_slabs,
            "done_slabs": self.done_slabs,
            "percent": 100.0 * self.done_slabs / self.total_slabs if self.total_slabs else 100.0,
            "started": self.started,
            "finished": self.finished,
            "bytes_checked": self.bytes_checked,
            "bytes_per_second": speed,
            "eta_seconds": per_slab * remaining if self.state == "running" else None,
            "rate_limit": self.rate_limit,
            "report": self.report.to_dict(),
            "error": self.error,
        }

    def to_state(self) -> dict[str, Any]:
        """What is saved so a restarted daemon can resume."""
        data = self.to_dict()
        data["cursor"] = [list(item) for item in self.cursor]
        return data

    @classmethod
    def from_state(cls, data: dict[str, Any]) -> "ScrubProgress":
        report_data = dict(data.get("report") or {})
        report = ScrubReport(
            bytes_checked=int(report_data.get("bytes_checked", 0)),
            blocks_checked=int(report_data.get("blocks_checked", 0)),
            checksum_errors=int(report_data.get("checksum_errors", 0)),
            mismatches=int(report_data.get("mismatches", 0)),
            repaired_blocks=int(report_data.get("repaired_blocks", 0)),
            unrecoverable=[
                (str(u["volume"]), int(u["offset"]), int(u["length"]))
                for u in report_data.get("unrecoverable", [])
            ],
            labels_repaired=[str(line) for line in report_data.get("labels_repaired", [])],
        )
        return cls(
            state=str(data.get("state", "idle")),
            volume=data.get("volume"),
            total_slabs=int(data.get("total_slabs", 0)),
            done_slabs=int(data.get("done_slabs", 0)),
            cursor=[(str(v), int(s)) for v, s in data.get("cursor", [])],
            started=float(data.get("started", 0.0)),
            finished=float(data.get("finished", 0.0)),
            bytes_checked=int(data.get("bytes_checked", 0)),
            rate_limit=int(data.get("rate_limit", 0)),
            report=report,
            error=str(data.get("error", "")),
        )


Save = Callable[[ScrubProgress], None]


class Scrubber:
    """One scrub at a time over a pool's volumes. `save` persists progress (the daemon
    writes it to the state directory) so a restart resumes where it stopped."""

    def __init__(
        self, volumes: Callable[[], dict[str, "Volume"]], save: Save,
        progress: ScrubProgress | None = None,
        *, check_labels: Callable[[], Awaitable[list[str]]] | None = None,
    ) -> None:
        self._volumes = volumes
        # Rewrites damaged label copies (pool/label_copies.py), once per run, reported.
        self._check_labels = check_labels
        self._save = save
        self.progress = progress or ScrubProgress()
        self._resume = trio.Event()
        if self.progress.state != "paused":
            self._resume.set()
        self._cancel_scope: trio.CancelScope | None = None
        self.finished = trio.Event()

    def plan(self, volume: str | None, rate_limit: int) -> None:
        volumes = self._volumes()
        names = [volume] if volume else sorted(volumes)
        cursor = [(name, slab) for name in names for slab in sorted(volumes[name].record.slabs)]
        self.progress = ScrubProgress(
            state="running", volume=volume, total_slabs=len(cursor), cursor=cursor,
            started=time.time(), rate_limit=rate_limit,
        )
        self.finished = trio.Event()
        self._save(self.progress)

    @property
    def active(self) -> bool:
        return self.progress.state in ("running", "paused")

    def pause(self) -> None:
        if self.progress.state == "running":
            self.progress.state = "paused"
            self._resume = trio.Event()
            self._save(self.progress)

    def resume(self) -> None:
        if self.progress.state == "paused":
            self.progress.state = "running"
            self._resume.set()
            self._save(self.progress)

    def cancel(self) -> None:
        if self.active:
            self.progress.state = "cancelled"
            self.progress.finished = time.time()
            self._resume.set()
            if self._cancel_scope is not None:
                self._cancel_scope.cancel()
            self._save(self.progress)
            self.finished.set()

    async def run(self, on_slab: Callable[[], Awaitable[None]] | None = None) -> None:
        """Work through the cursor; returns when done, cancelled, or on error."""
        progress = self.progress
        with trio.CancelScope() as scope:
            self._cancel_scope = scope
            if self._check_labels is not None and progress.state == "running":
                progress.report.labels_repaired.extend(await self._check_labels())
            last_save = time.monotonic()
            while progress.cursor and progress.state in ("running", "paused"):
                if progress.state == "paused":
                    await self._resume.wait()
                    continue
                name, slab = progress.cursor[0]
                volume = self._volumes().get(name)
                began = time.monotonic()
                if volume is not None:
                    slab_report = await scrub_slab(volume, slab)
                    progress.report.add(slab_report)
                    progress.bytes_checked += slab_report.bytes_checked
                    await self._throttle(slab_report.bytes_checked, time.monotonic() - began)
                progress.cursor.pop(0)
                progress.done_slabs += 1
                if on_slab is not None:
                    await on_slab()
                if time.monotonic() - last_save > 1.0:
                    self._save(progress)
                    last_save = time.monotonic()
            if progress.state == "running":
                progress.state = "done"
                progress.finished = time.time()
                log.info("scrub done: %s", progress.report.summary())
        self._cancel_scope = None
        self._save(progress)
        self.finished.set()

    async def _throttle(self, nbytes: int, took: float) -> None:
        limit = self.progress.rate_limit
        if limit > 0:
            await trio.sleep(max(0.0, nbytes / limit - took))
        else:
            await trio.lowlevel.checkpoint()
