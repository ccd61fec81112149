"""Moving extents: rebuild onto free space, evacuate a retiring disk, replace a disk.

One move takes one extent of one slab to a new extent on another disk:
copy (from the extent itself if it verifies, else from the other copies or rebuilt from
parity) -> verify the new extent against its checksums -> commit the new slab map -> free
the old extent. The slab's rows are locked for the whole move, so no write can slip in
between the copy and the switch. Each move is atomic in the metadata, so a crash leaves
either the old map or the new one; a restarted rebuild just plans again from the disk
states.
"""

import logging
import time
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from blockspace.errors import BlockspaceError, DeviceError, InvalidInput, NoSpace, Unrecoverable
from blockspace.geometry.allocator import ExtentAllocator
from blockspace.ondisk.checksums import CSUM_BLOCK, bad_blocks
from blockspace.volume.row_locks import column_rows

if TYPE_CHECKING:
    from blockspace.pool.pool import Pool
    from blockspace.volume.extent_io import Extents
    from blockspace.volume.volume import Volume

log = logging.getLogger(__name__)

CHUNK = 1 << 20
PARALLEL_MOVES = 4  # slabs moved at once
REPLAN_ROUNDS = 5  # passes over what is left on the disks being emptied
# Disks whose extents a repair moves away: out of service, or being retired.
EVACUATE_STATES = ("failed", "missing", "retiring")
# The lowest --rate: below it one extent takes longer than anyone waits for (at 1 byte/s a
# 64 MiB extent takes two years), and the job would hold the disks for good.
MIN_RATE = 1 << 20


def check_rate(rate: int) -> int:
    """A rebuild's bandwidth limit in bytes/s: 0 (none) or at least MIN_RATE."""
    if rate < 0 or 0 < rate < MIN_RATE:
        raise InvalidInput(f"--rate must be at least 1M (per second), or 0 for no limit; "
                           f"not {rate} bytes/s")
    return rate


@dataclass(frozen=True)
class Move:
    volume: str
    slab: int
    position: int
    disk_id: int  # the disk the extent leaves
    target: int | None = None  # the disk it should go to (else: the most free)


def plan_rebalance(pool: "Pool") -> list[Move]:
    """Moves that even out how full the online disks are (after disks were added): take
    an extent from the fullest disk to the emptiest one not already holding its slab,
    while that narrows the gap by more than one extent."""
    disks = pool.usable_disk_ids()
    total = {d: pool.disks[d].record.extent_count for d in disks}
    used = {d: pool.extents_on(d) for d in disks}
    placements = {
        (volume.name, slab): list(extents)
        for volume in pool.metadata.volumes for slab, extents in volume.slabs.items()
    }
    other_media = {v.name: set(pool.media_excluded(v)) for v in pool.metadata.volumes}
    moves: list[Move] = []
    for _ in range(sum(used.values())):
        source = max(disks, key=lambda d: (used[d] / total[d], d))
        best: tuple[float, Move] | None = None
        for (name, slab), extents in placements.items():
            holders = {d for d, _ in extents}
            if source not in holders:
                continue
            for target in disks:
                if target in holders or used[target] >= total[target]:
                    continue
                if target in other_media[name]:
                    continue  # a tier's extents stay on its media class
                gap = used[source] / total[source] - (used[target] + 1) / total[target]
                if gap > 0 and (best is None or gap > best[0]):
                    position = next(i for i, (d, _) in enumerate(extents) if d == source)
                    best = (gap, Move(name, slab, position, source, target))
        if best is None:
            break
        move = best[1]
        moves.append(move)
        used[move.disk_id] -= 1
        assert move.target is not None
        used[move.target] += 1
        extents = placements[(move.volume, move.slab)]
        extents[move.position] = (move.target, -1)
    return moves


def plan_moves(pool: "Pool", disk_ids: Collection[int]) -> list[Move]:
    """Every extent on `disk_ids`, slab by slab."""
    moves = []
    for record in pool.metadata.volumes:
        for slab, extents in sorted(record.slabs.items()):
            for position, (disk_id, _) in enumerate(extents):
                if disk_id in disk_ids:
                    moves.append(Move(record.name, slab, position, disk_id))
    return moves


def check_moves_fit(pool: "Pool", moves: list[Move], *, prefer: int | None = None) -> None:
    """NoSpace, before anything moves, if some extent would have nowhere to go."""
    usable = set(pool.usable_disk_ids()) - {m.disk_id for m in moves}
    sim = ExtentAllocator(
        {d: pool.disks[d].record.extent_count for d in usable},
        [(d, e) for d, e in pool.metadata.used_extents() if d in usable],
    )
    stuck = 0
    taken: dict[tuple[str, int], set[int]] = {}  # disks a slab gets during this plan
    for move in moves:
        record = pool.metadata.volume(move.volume)
        extents = record.slabs[move.slab]
        chosen = taken.setdefault((move.volume, move.slab), set())
        other_media = set(pool.media_excluded(record))
        try:
            disk_id, _ = _choose(sim, {d for d, _ in extents} | chosen | other_media, prefer)
            chosen.add(disk_id)
        except NoSpace:
            stuck += 1
    if stuck:
        raise NoSpace(
            f"not enough free space: {stuck} of {len(moves)} extents would have no disk to go to "
            "(each must land on a disk not already holding its slab); add a disk first"
        )


def check_moves_sources(pool: "Pool", moves: list[Move]) -> None:
    """Unrecoverable, before anything moves, if some extent leaving a disk that is out of
    service has nothing to be rebuilt from (more of its slab is out than the layout
    tolerates: a simple volume's dead disk, or a mirror with every copy gone)."""
    from blockspace.geometry.layouts import LayoutSpec

    lost: dict[str, set[int]] = {}
    for move in moves:
        record = pool.metadata.volume(move.volume)
        extents = record.slabs[move.slab]
        if pool.extent_device(*extents[move.position]) is not None:
            continue  # the extent is readable where it is
        tolerance = LayoutSpec.from_dict(record.layout).tolerance
        if sum(pool.extent_device(*extent) is None for extent in extents) > tolerance:
            lost.setdefault(move.volume, set()).add(move.slab)
    if lost:
        detail = "; ".join(f"volume {v}: slabs {sorted(s)[:8]}" for v, s in sorted(lost.items()))
        count = sum(len(s) for s in lost.values())
        raise Unrecoverable(
            f"{count} slabs have more disks out of service than their resiliency tolerates, "
            f"so their data cannot be rebuilt ({detail}); bring the disk back online "
            "(`disk online`) instead, or delete the volume"
        )


def _choose(allocator: ExtentAllocator, exclude: Collection[int], prefer: int | None) -> tuple[
    int, int
]:
    if prefer is not None and prefer not in exclude and allocator.free_extents(prefer) > 0:
        others = [d for d in allocator.disk_ids if d != prefer]
        return allocator.allocate(1, exclude=others)[0]
    return allocator.allocate(1, exclude=exclude)[0]


async def move_extent(volume: "Volume", move: Move, *, prefer: int | None = None) -> int:
    """Move one extent; returns bytes copied. Unrecoverable if its data cannot be had."""
    pool = volume.pool
    async with volume.row_locks.hold(column_rows(volume.spec, move.slab, 0, pool.slab_size)):
        extents = volume.record.slabs.get(move.slab)
        if extents is None or extents[move.position][0] != move.disk_id:
            return 0  # already moved (or the slab went away)
        exclude = ({d for d, _ in extents} | set(pool.unusable_disk_ids())
                   | set(pool.media_excluded(volume.record)))  # a tier keeps its media
        target = _choose(pool.allocator, exclude, move.target if move.target is not None
                         else prefer)
        try:
            await _copy_to(volume, extents, move, target)
        except BaseException:
            pool.allocator.release([target])
            raise
        old = extents[move.position]
        new_extents = list(extents)
        new_extents[move.position] = target
        volume.record.slabs[move.slab] = new_extents
        # Shielded: a cancel (`disk rebuild --cancel`, an unmount) that cut the commit short
        # could leave the new map on some disks while memory goes back to the old one, and
        # writes to the old extent would be lost at the next open. It finishes, or fails.
        with trio.CancelScope(shield=True):
            try:
                await pool.commit()
            except BaseException:
                volume.record.slabs[move.slab] = extents
                pool.allocator.release([target])
                raise
        pool.allocator.release([old])
        geometry = pool.disks[old[0]].geometry
        pool.checksums.forget_extent(old[0], old[1], geometry.checksum_area_size // CSUM_BLOCK)
        return pool.slab_size


async def _copy_to(
    volume: "Volume", extents: "Extents", move: Move, target: tuple[int, int]
) -> None:
    pool = volume.pool
    disk_id, extent = target
    device = pool.device(disk_id)
    if device is None:
        raise DeviceError(f"target disk {disk_id} is not available")
    pool.checksums.forget_extent(
        disk_id, extent, pool.disks[disk_id].geometry.checksum_area_size // CSUM_BLOCK
    )
    base = pool.extent_offset(disk_id, extent)
    sent: list[bytes] = []  # the entries written, chunk by chunk
    for start in range(0, pool.slab_size, CHUNK):
        end = min(start + CHUNK, pool.slab_size)
        # Verified, from the extent itself or from the rest of the slab.
        data, entries = await volume.redundancy.extent_contents(move.slab, extents,
                                                                move.position, start, end)
        await device.write(base + start, data)
        await pool.checksums.write(disk_id, extent, start // CSUM_BLOCK, entries)
        sent.append(entries)
        await trio.lowlevel.checkpoint()
    await device.flush()
    # Verify what landed before the map points at it: data and entries as the disk returns
    # them (the checksum cache holds what was sent, whatever the disk kept).
    for chunk, start in enumerate(range(0, pool.slab_size, CHUNK)):
        end = min(start + CHUNK, pool.slab_size)
        written = await device.read(base + start, end - start)
        stored = await pool.checksums.read_from_disk(disk_id, extent, start // CSUM_BLOCK,
                                                     (end - start) // CSUM_BLOCK)
        if stored != sent[chunk] or bad_blocks(written, stored):
            raise DeviceError(f"verification of the copy on disk {disk_id} failed")


# ---- the background task ----------------------------------------------------------------


@dataclass
class RebuildProgress:
    state: str = "idle"  # idle, running, done, failed, cancelled
    reason: str = ""  # what it is for: repair, retire disk N, replace disk N
    total: int = 0
    done: int = 0
    failed: int = 0
    bytes_moved: int = 0
    started: float = 0.0
    finished: float = 0.0
    rate_limit: int = 0
    errors: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        elapsed = (self.finished or time.time()) - self.started if self.started else 0.0
        speed = self.bytes_moved / elapsed if elapsed > 0 else 0.0
        per_move = elapsed / self.done if self.done else 0.0
        return {
            "state": self.state,
            "reason": self.reason,
            "total": self.total,
            "done": self.done,
            "failed": self.failed,
            "percent": 100.0 * (self.done + self.failed) / self.total if self.total else 100.0,
            "bytes_moved": self.bytes_moved,
            "bytes_per_second": speed,
            "eta_seconds": per_move * (self.total - self.done - self.failed)
            if self.state == "running" else None,
            "started": self.started,
            "finished": self.finished,
            "rate_limit": self.rate_limit,
            "errors": self.errors[-20:],
        }


class Rebuilder:
    """Runs moves one slab at a time (slabs on different disks could overlap; one at a
    time keeps foreground I/O responsive and the rate limit simple)."""

    def __init__(self, pool: "Pool", volumes: Callable[[], dict[str, "Volume"]]) -> None:
        self.pool = pool
        self.volumes = volumes
        self.progress = RebuildProgress()
        self.finished = trio.Event()
        self.finished.set()
        self._rate_changed = trio.Event()  # wakes the movers waiting for their turn

    def set_rate(self, rate_limit: int) -> None:
        """Change the bandwidth limit of the running job (0: none), at once: movers
        waiting for their turn under the old rate look again."""
        self.progress.rate_limit = rate_limit
        self._rate_changed.set()
        self._rate_changed = trio.Event()

    async def _wait_turn(self, progress: RebuildProgress, pace: dict[str, float]) -> None:
        """Start one move no sooner than one extent's worth of time at the current rate
        after the last one started (the rate may change while it waits)."""
        while progress.rate_limit:
            now = trio.current_time()
            due = pace["last"] + self.pool.slab_size / progress.rate_limit
            if due <= now:
                pace["last"] = now
                return
            changed = self._rate_changed
            with trio.move_on_at(due):
                await changed.wait()

    @property
    def active(self) -> bool:
        return self.progress.state == "running"

    async def _move_one(self, move: Move, prefer: int | None, progress: RebuildProgress) -> None:
        volume = self.volumes().get(move.volume)
        try:
            if volume is not None:
                progress.bytes_moved += await move_extent(volume, move, prefer=prefer)
            progress.done += 1
        except (BlockspaceError, ValueError) as error:
            progress.failed += 1
            progress.errors.append(f"{move.volume} slab {move.slab}: {error}")
            log.error("rebuild of %s slab %d failed: %s", move.volume, move.slab, error)

    async def run_task(
        self, reason: str, work: Callable[[RebuildProgress], Awaitable[None]]
    ) -> RebuildProgress:
        """Other background work on the disks (a returning disk's resync), reported and
        waited for like a rebuild."""
        self.progress = progress = RebuildProgress(state="running", reason=reason,
                                                   started=time.time())
        if self.finished.is_set():
            self.finished = trio.Event()
        try:
            await work(progress)
            progress.state = "done"
        except BlockspaceError as error:
            progress.state = "failed"
            progress.errors.append(str(error))
            log.error("%s failed: %s", reason, error)
        except trio.Cancelled:
            progress.state = "cancelled"
            raise
        finally:
            progress.finished = time.time()
            self.finished.set()
        return progress

    async def run(
        self, moves: list[Move], reason: str, *, prefer: int | None = None, rate_limit: int = 0,
        after: Callable[[], Awaitable[None]] | None = None,
        replan: Callable[[], list[Move]] | None = None,
    ) -> RebuildProgress:
        self.progress = progress = RebuildProgress(
            state="running", reason=reason, total=len(moves), started=time.time(),
            rate_limit=rate_limit,
        )
        if self.finished.is_set():
            self.finished = trio.Event()
        sources = {move.disk_id for move in moves} - self.pool.evacuating
        self.pool.evacuating |= sources
        try:
            # Several slabs at once: their sources and targets are spread over all disks.
            # Extents of one slab still move one at a time (each move locks its slab).
            limiter = trio.CapacityLimiter(PARALLEL_MOVES)
            pace = {"last": -float("inf")}  # when the last move started, for the rate

            async def mover(move: Move) -> None:
                async with limiter:
                    await self._wait_turn(progress, pace)
                    await self._move_one(move, prefer, progress)

            for _ in range(REPLAN_ROUNDS):
                async with trio.open_nursery() as nursery:
                    for move in moves:
                        nursery.start_soon(mover, move)
                # Writes meanwhile may have placed new slabs degraded on a disk being
                # emptied (the only out-of-service disk with room): take those too.
                if replan is None or progress.failed:
                    break
                moves = replan()
                if not moves:
                    break
                progress.total += len(moves)
            outcome = "done" if not progress.failed else "failed"
            if after is not None:
                # Part of the job: `--wait` polls the state, and a disk being removed is
                # still open (its lock held) until the wrap-up ends.
                try:
                    await after()
                except BlockspaceError as error:
                    outcome = "failed"
                    progress.errors.append(f"{reason}: {error}")
                    log.error("%s: its wrap-up failed: %s", reason, error)
            progress.state = outcome
        except trio.Cancelled:
            progress.state = "cancelled"
            raise
        finally:
            if progress.state == "running":  # ended by an error nobody expected
                progress.state = "failed"
            self.pool.evacuating -= sources
            progress.finished = time.time()
            self.finished.set()
            log.info("rebuild (%s) %s: %d moved, %d failed", reason, progress.state,
                     progress.done, progress.failed)
        return progress
