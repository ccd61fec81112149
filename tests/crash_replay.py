"""Targeted power cuts: record every device operation of one run, then rebuild the disks as a
cut right after any chosen operation would leave them, and check each such image.

`crashsim` cuts at a random device operation or checkpoint. An ordering bug (a write made
durable before one it depends on) lives in a window of a few operations out of hundreds, so
random cuts rarely land in it (issue 21: the zeroing-flush and intent-cleaner mutations
survived 400-450 random cuts). Here one scripted run on `PowerCutDevice`s records, in order,
every write, zero and flush each disk took, with its rail operation number. A disk image
after a cut right after operation n is then exactly: the disk as created, plus every write
that a flush of that disk at or before n made durable, plus whichever of the still unflushed
writes (at or before n) the cut lets land. That is how dm-log-writes and CrashMonkey replay a
log; it is equivalent to re-running the workload with `PowerRail.arm` set to cut at n + 1
(the run is the same up to there), without paying for the run again.

Two ways a cut lands the unflushed writes, both legal for a disk with a volatile cache:

* "flushed": none of them (the image is what the flushes made durable), taken right after
  every flush: the first flush of a fan-out over the disks makes one disk durable and not
  the others, the state a missing flush between two ordered steps exposes;
* "alone": only the write just issued, taken right after every write and zero: the newest
  step reached the media and everything before it that was not flushed yet did not.

What each cut must satisfy is crashsim's: the pool opens, each block of the workload's
region reads as its acknowledged version or a newer one (`BlockModel`, with the writes
acknowledged by a flush that had returned before operation n + 1), and with disks up to the
layout's tolerance lost after the remount, the same versions.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial

import trio
import trio.testing

from blockspace.disks.devices import Buffer
from blockspace.errors import BlockspaceError
from blockspace.ondisk.label import INTENT_SLOT_SIZE, LABEL_SIZE, DiskGeometry, compute_geometry
from blockspace.pool.intent import IntentLog, decode_intent
from blockspace.pool.intent import Key as IntentKey
from blockspace.pool.pool import Pool
from blockspace.testing import crashsim
from blockspace.testing.crashsim import (
    BLOCK,
    BlockModel,
    CrashLayout,
    PowerCutDevice,
    PowerRail,
    TrialResult,
    mount_like_daemon,
    settle_after_reopen,
    stale_fill,
)
from blockspace.testing.memory_device import MemoryDevice
from blockspace.volume.volume import Volume

MiB = 1 << 20
DISK_SIZE = 3 * MiB + 12 * 1024  # two extents a disk: the two slabs written
SLAB_SIZE = MiB
META_SLOT_SIZE = 64 << 10
VOLUME = "vol"


# ---- the operation log ----------------------------------------------------------------


@dataclass(frozen=True)
class Op:
    """One write, zero or flush a disk took (`number`: the rail's operation count then)."""

    number: int
    disk: int
    kind: str  # "write" | "zero" | "flush"
    offset: int
    length: int
    data: bytes | None  # a write's bytes; None for a zero or a flush
    area: str  # what the write is: see `classify`

    def describe(self) -> str:
        if self.kind == "flush":
            return f"op {self.number}: flush of disk {self.disk}"
        return (f"op {self.number}: {self.area} ({self.kind} of {self.length} bytes at "
                f"{self.offset}) on disk {self.disk}")


def classify(geometry: DiskGeometry, offset: int, kind: str) -> str:
    """Which ordered step a write or zero at `offset` is, from the disk's geometry."""
    if kind == "flush":
        return "flush"
    if offset < LABEL_SIZE or offset >= geometry.backup_label_offset:
        return "label"
    if geometry.meta_offset <= offset < geometry.meta_slot_offset(1) + geometry.meta_slot_size:
        return "metadata"
    if geometry.intent_slot_offset(0) <= offset < geometry.intent_slot_offset(1) + INTENT_SLOT_SIZE:
        return "intent record"
    if offset < geometry.data_start:
        return "padding"
    within = (offset - geometry.data_start) % geometry.extent_stride
    if kind == "zero":
        return "extent zeroing"
    return "data" if within < geometry.slab_size else "checksums"


class RecordingDevice(PowerCutDevice):
    """A `PowerCutDevice` that logs each write, zero and flush once it has taken effect
    (an operation refused because the power is off is not logged)."""

    def __init__(self, inner: MemoryDevice, *, rail: PowerRail, sector: int, index: int,
                 geometry: DiskGeometry, log: list[Op]) -> None:
        super().__init__(inner, rail=rail, sector=sector)
        self.index = index
        self.geometry = geometry
        self.log = log
        self.power = rail

    def _record(self, kind: str, offset: int, length: int, data: bytes | None) -> None:
        # No checkpoint since the operation ticked the rail: `ops` is its number.
        self.log.append(Op(self.power.ops, self.index, kind, offset, length, data,
                           classify(self.geometry, offset, kind)))

    def write_sync(self, offset: int, data: Buffer) -> None:
        super().write_sync(offset, data)
        self._record("write", offset, memoryview(data).nbytes, bytes(data))

    def zero_sync(self, offset: int, length: int) -> None:
        super().zero_sync(offset, length)
        self._record("zero", offset, length, None)

    def flush_sync(self) -> None:
        super().flush_sync()
        self._record("flush", 0, 0, None)


# ---- the scripted workload --------------------------------------------------------------


@dataclass
class Recording:
    """One recorded run: the disks as created (stale data in the extents), every operation,
    the model of the region written, and when each flush that acknowledged writes returned
    (rail operation count at that moment, the model's stamp it acknowledged)."""

    layout: CrashLayout
    initial: list[bytes] = field(repr=False)
    ops: list[Op] = field(repr=False)
    workload_start: int  # operations up to this one built and mounted the pool
    model: BlockModel = field(repr=False)
    pool_uuid: str
    acks: list[tuple[int, int]] = field(default_factory=list)
    final: list[bytes] = field(default_factory=list, repr=False)  # the inner disks at the end

    def ack_at(self, number: int) -> int:
        """The model stamp acknowledged when the power goes right after operation `number`:
        flushes that returned before the next operation started."""
        return max((stamp for at, stamp in self.acks if at <= number), default=0)


class Script:
    """The workload's steps: pattern writes the model tracks, and flushes that acknowledge."""

    def __init__(self, volume: Volume, model: BlockModel, rail: PowerRail,
                 acks: list[tuple[int, int]]) -> None:
        self.volume = volume
        self.model = model
        self.rail = rail
        self.acks = acks

    async def write(self, block: int, blocks: int = 0, *, skip: int = 0, length: int = 0
                    ) -> None:
        """Write `blocks` whole blocks from `block`, or `length` bytes `skip` bytes in."""
        offset = block * BLOCK + skip
        length = length or blocks * BLOCK
        assert self.model.can_write(offset, length), "the script breaks the model's rules"
        seq, data = self.model.begin(offset, length)
        try:
            await self.volume.write(offset, data)
        except BaseException:
            self.model.end(seq, False)
            raise
        self.model.end(seq, True)

    async def flush(self) -> None:
        token = self.model.flush_begin()
        await self.volume.flush()
        self.model.flush_end(token)
        self.acks.append((self.rail.ops, token))


async def workload(script: Script, boundary: int, *, longer: bool = False) -> None:
    """Every ordered step of the write path, around the boundary between slabs 0 and 1:
    allocation (zero, flush, metadata commit), intent records marking regions dirty, data
    and checksum writes (whole blocks, a partial block, partial parity rows), two writers at
    once, flushes, and the intent-log cleaner clearing regions whose last writes no volume
    flush has made durable. `longer` goes on: the cleaner at work again, and writes over
    older versions across the boundary."""
    await script.write(boundary - 8, 2)  # slab 0 is allocated
    await script.flush()
    await script.write(boundary - 2, 4)  # straddles: slab 1 is allocated
    async with trio.open_nursery() as nursery:
        nursery.start_soon(script.write, boundary - 7, 3)
        nursery.start_soon(partial(script.write, boundary - 8, skip=100, length=1000))
    await trio.sleep(16)  # idle: the cleaner clears both regions, those writes unflushed
    await script.write(boundary + 1, 2)  # slab 1's region is dirty again
    await script.flush()
    if not longer:
        return
    await script.write(boundary + 3, 2)
    await trio.sleep(16)  # cleared again, that write unflushed
    await script.write(boundary - 4, 5)  # across the boundary, over older versions
    await script.flush()


@contextmanager
def quiet_and_ordered(seed: int) -> Iterator[None]:
    """What `crashsim.run_trial` does around a trial: waiters woken in a fixed order and a
    seeded scheduler (the same seed replays the same run), and the pool's warnings about
    failed requests and unclean stops silenced (the verdicts say more)."""
    crashsim.seed_trio_scheduler(seed)
    library_log = logging.getLogger("blockspace")
    level = library_log.level
    library_log.setLevel(max(level, logging.CRITICAL))
    event_class = trio.Event
    trio.Event = crashsim.OrderedEvent  # type: ignore[misc,assignment]
    try:
        with crashsim.inline_threads():
            yield
    finally:
        trio.Event = event_class  # type: ignore[misc]
        library_log.setLevel(level)


def record(layout_name: str, *, longer: bool = False, seed: int = 0,
           cut_after: int | None = None) -> Recording:
    """Build a pool like `crashsim.crash_pool` (stale extents, created offline, mounted like
    the daemon, sector 4096: disks that never tear a block), run `workload` with the intent
    log's cleaner in the background and record it. With `cut_after`, the rail cuts the
    power ("drop_all") as operation cut_after + 1 starts, the way crashsim's trials cut,
    and the workload ends there (its requests fail)."""
    layout = crashsim.LAYOUTS[layout_name]
    spec = layout.spec
    assert spec is not None
    geometry = compute_geometry(DISK_SIZE, SLAB_SIZE, META_SLOT_SIZE)
    inner = [MemoryDevice(DISK_SIZE, path=f"mem{i}") for i in range(layout.disks)]
    for device in inner:
        stale_fill(device, geometry.data_start)
    initial = [bytes(device.data) for device in inner]
    ops: list[Op] = []
    rail = PowerRail()
    devices = [RecordingDevice(device, rail=rail, sector=BLOCK, index=index,
                               geometry=geometry, log=ops)
               for index, device in enumerate(inner)]
    recording: Recording | None = None

    async def run() -> None:
        nonlocal recording
        pool = await Pool.create("crash", devices, media=["hdd"] * len(devices),
                                 slab_size=SLAB_SIZE, meta_slot_size=META_SLOT_SIZE)
        await pool.create_volume(VOLUME, spec.slab_data_size(SLAB_SIZE) * 2, spec, "thin")
        await pool.flush()
        pool, volume = await mount_like_daemon(devices, VOLUME)
        boundary = volume.slab_data_size // BLOCK
        model = BlockModel(boundary - 12, 24)
        recording = Recording(layout, initial, ops, rail.ops, model, pool.uuid)
        intent = pool.intent
        assert isinstance(intent, IntentLog)
        if cut_after is not None:
            rail.arm(cut_after + 1 - rail.ops, mode="drop_all")
        try:
            async with trio.open_nursery() as daemon:
                daemon.start_soon(intent.run_cleaner)
                await workload(Script(volume, model, rail, recording.acks), boundary,
                               longer=longer)
                daemon.cancel_scope.cancel()
        except* BlockspaceError:
            if not rail.off:  # only the power cut may end the workload early
                raise

    with quiet_and_ordered(seed):
        trio.run(run, clock=trio.testing.MockClock(autojump_threshold=0))
    assert recording is not None
    recording.final = [bytes(device.data) for device in inner]
    return recording


def intent_records(recording: Recording) -> list[tuple[Op, int, set[IntentKey]]]:
    """Every intent record the run wrote, decoded: (its write, generation, dirty regions)."""
    out = []
    for op in recording.ops:
        if op.area == "intent record" and op.data is not None:
            generation, keys, _ = decode_intent(op.data, recording.pool_uuid)
            out.append((op, generation, keys))
    return out


def unflushed_clearings(recording: Recording) -> list[tuple[Op, int]]:
    """The intent records of the workload that drop regions the generation before held
    (the cleaner at work), each with how many data and checksum writes went to the disks
    after the last volume flush returned and before it: writes only the cleaner's own
    flush can have made durable. Empty: the script no longer tests that ordering."""
    records = [(op, generation, keys) for op, generation, keys in intent_records(recording)
               if op.number > recording.workload_start]
    first_write: dict[int, Op] = {}
    held: dict[int, set[IntentKey]] = {}
    for op, generation, keys in records:
        first_write.setdefault(generation, op)
        held[generation] = keys
    out = []
    generations = sorted(held)
    for before, generation in zip(generations, generations[1:], strict=False):
        if not held[before] - held[generation]:
            continue
        at = first_write[generation].number
        last_ack = max((number for number, _ in recording.acks if number < at), default=0)
        writes = sum(1 for op in recording.ops if last_ack < op.number < at
                     and op.area in ("data", "checksums"))
        if writes:
            out.append((first_write[generation], writes))
    return out


# ---- crash images and their checks -----------------------------------------------------


@dataclass(frozen=True)
class Cut:
    after: Op  # the power goes right after this operation
    mode: str  # "flushed" | "alone"

    def describe(self) -> str:
        landed = "nothing unflushed landed" if self.mode == "flushed" else "it alone landed"
        return f"cut right after {self.after.describe()}; {landed}"


def targeted_cuts(recording: Recording) -> list[Cut]:
    """A cut right after each flush (nothing unflushed lands) and each write or zero (it
    alone lands), from the first operation of the workload on; cuts that give the same
    disks and acknowledgements as an earlier one are left out."""
    cuts: list[Cut] = []
    seen: set[tuple[object, ...]] = set()
    durable = [0] * recording.layout.disks  # per disk: ops made durable, as a count
    since_flush: list[list[Op]] = [[] for _ in range(recording.layout.disks)]
    for op in recording.ops:
        if op.kind == "flush":
            durable[op.disk] += len(since_flush[op.disk])
            since_flush[op.disk] = []
        else:
            since_flush[op.disk].append(op)
        if op.number <= recording.workload_start:
            continue
        # "flushed" after a write too: new only where a flush returned just before it.
        for mode in ("flushed",) if op.kind == "flush" else ("flushed", "alone"):
            landed = () if mode == "flushed" else (op.number,)
            key = (tuple(durable), landed, recording.ack_at(op.number))
            if key not in seen:
                seen.add(key)
                cuts.append(Cut(op, mode))
    return cuts


def crash_image(recording: Recording, cut: Cut) -> list[bytearray]:
    """The inner disks as the power cut `cut` leaves them."""
    images = [bytearray(image) for image in recording.initial]
    pending: list[list[Op]] = [[] for _ in images]
    for op in recording.ops:
        if op.number > cut.after.number:
            break
        if op.kind == "flush":
            for write in pending[op.disk]:
                _apply(images[op.disk], write)
            pending[op.disk] = []
        else:
            pending[op.disk].append(op)
    if cut.mode == "alone":
        _apply(images[cut.after.disk], cut.after)
    return images


def _apply(image: bytearray, op: Op) -> None:
    image[op.offset : op.offset + op.length] = op.data if op.data is not None else bytes(
        op.length)


def _disks(images: Sequence[bytearray], without: Sequence[int] = ()) -> list[MemoryDevice]:
    """Memory disks holding copies of `images`, but those at the indexes in `without`."""
    disks = []
    for index, image in enumerate(images):
        if index in without:
            continue
        disk = MemoryDevice(len(image), path=f"mem{index}")
        disk.data[:] = image
        disks.append(disk)
    return disks


async def _mount(disks: list[MemoryDevice]) -> tuple[Pool, Volume]:
    pool, volume = await mount_like_daemon(disks, VOLUME)
    await settle_after_reopen(pool, volume)
    return pool, volume


async def check_cut(recording: Recording, cut: Cut, loss_sets: Sequence[tuple[int, ...]]
                    ) -> TrialResult:
    """Mount the image `cut` leaves, check every block of the region, then (after a clean
    stop) the same with each set of disks in `loss_sets` lost."""
    model = recording.model
    model.ack_stamp = recording.ack_at(cut.after.number)
    result = TrialResult(recording.layout.name, cut.after.number, cut.mode, "targeted")
    disks = _disks(crash_image(recording, cut))
    try:
        pool, volume = await _mount(disks)
    except Exception as error:  # noqa: BLE001 - the pool must always open: a verdict
        crashsim.record_failure(result, "open", "open", None, f"{type(error).__name__}: {error}")
        return result
    blocks = await crashsim.read_blocks(volume, model.first, model.count)
    healthy = crashsim.check_blocks(model, blocks, result, "read")
    await pool.close_intent_log()  # a clean stop: what a disk loss finds afterwards
    pool.close()
    # The disks as that mount left them (resynced, healed), less the ones lost.
    images = [disk.data for disk in disks]
    for lost in loss_sets:
        phase = f"read without disk{'s' if len(lost) > 1 else ''} {','.join(map(str, lost))}"
        try:
            pool, volume = await _mount(_disks(images, lost))
        except Exception as error:  # noqa: BLE001
            crashsim.record_failure(result, phase, "open", None,
                                    f"{type(error).__name__}: {error}")
            continue
        blocks = await crashsim.read_blocks(volume, model.first, model.count)
        crashsim.check_blocks(model, blocks, result, phase, healthy=healthy)
        pool.close()
    return result


def loss_sets_for(cut: Cut, disks: int, tolerance: int, rng: random.Random, *, every: bool
                  ) -> list[tuple[int, ...]]:
    """Which sets of disks to lose after the remount of `cut`'s image (every set up to the
    tolerance with `every`). Otherwise a cut right after a flush, where one disk has just
    become durable and the others not, loses each disk on its own (so whichever copy or
    column the healthy read used, one loss exposes one that disagrees) and, with a
    tolerance of 2, one pair; a cut where one write alone landed loses the disk it landed
    on, and one set of the largest size (`crashsim.loss_sets` draws it)."""
    if tolerance == 0:
        return []
    if every:
        return crashsim.loss_sets(disks, tolerance, rng, None)
    largest = crashsim.loss_sets(disks, tolerance, rng, 1)
    if cut.mode == "flushed":
        singles = [(disk,) for disk in range(disks)]
        return singles + (largest if tolerance > 1 else [])
    return sorted({(cut.after.disk,), *largest}, key=lambda lost: (len(lost), lost))


def check_cuts(recording: Recording, cuts: Sequence[Cut], *, every_loss: bool = False,
               seed: int = 0) -> list[tuple[Cut, TrialResult]]:
    """`check_cut` for each cut, losing the disks `loss_sets_for` picks, in one trio run on
    a mock clock (retry back-offs and timeouts cost no real time)."""
    spec = recording.layout.spec
    assert spec is not None
    rng = random.Random(seed)
    results: list[tuple[Cut, TrialResult]] = []

    async def run() -> None:
        for cut in cuts:
            losses = loss_sets_for(cut, recording.layout.disks, spec.tolerance, rng,
                                   every=every_loss)
            results.append((cut, await check_cut(recording, cut, losses)))

    with quiet_and_ordered(seed):
        trio.run(run, clock=trio.testing.MockClock(autojump_threshold=0))
    return results


def first_difference(images: Sequence[bytes | bytearray], disks: Sequence[bytes]) -> str | None:
    """Where two sets of disk images first differ, in words; None if they are equal."""
    if len(images) != len(disks):
        return f"{len(images)} disks against {len(disks)}"
    for index, (image, disk) in enumerate(zip(images, disks, strict=True)):
        if image != disk:
            at = next((i for i, (a, b) in enumerate(zip(image, disk, strict=False)) if a != b),
                      min(len(image), len(disk)))
            return f"disk {index} differs first at byte {at}"
    return None


def replayed_end(recording: Recording) -> list[bytearray]:
    """The disks rebuilt from the log as the last operation left them, nothing unflushed
    landed: must equal the inner disks of the recorded run (proof that the log is whole)."""
    last = recording.ops[-1]
    return crash_image(recording, Cut(last, "flushed"))

