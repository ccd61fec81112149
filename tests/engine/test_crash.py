"""Power cuts at random instants, on every layout: design invariant 1.

The disks are `crashsim.PowerCutDevice`s: writes sit in a volatile cache until a flush,
and a cut lands a random subset of them, in random order, some torn at 512-byte sectors
(as dm-log-writes / CrashMonkey replay them). Concurrent writers put a verifiable pattern
on the volume and flush at random points; the power goes at a random device operation or
trio checkpoint; then the pool must open, every block acknowledged by a completed flush
must read as that version or a newer one, and nothing may read as bytes never written to
that block. With redundancy, the same must hold with any disk(s) up to the layout's
tolerance missing, and the surviving copies / parity must give the block read before.

Every trial is seeded; a failure names the seed and how to replay it:
    tools/crashloop powercut --layouts LAYOUT --seed SEED --cuts 1 -v
"""

import random
from dataclasses import dataclass, field

import crash_replay
import pytest
import trio

from blockspace.errors import DeviceError
from blockspace.geometry.layouts import LayoutSpec
from blockspace.testing import crashsim
from blockspace.testing.crashsim import (
    BLOCK,
    BlockModel,
    CampaignRow,
    PowerCutDevice,
    PowerRail,
    TrialResult,
    describe_block,
    pattern_block,
)
from blockspace.testing.memory_device import MemoryDevice

CUTS_PER_LAYOUT = 20
LAYOUT_NAMES = ["simple", "mirror-2", "mirror-3", "parity-1", "parity-2"]
SHOWN_SEEDS = 8
SHOWN_FAILURES = 3


# ---- the power-cut device ---------------------------------------------------------------


def _device(size: int = 16 * 4096, sector: int = 512) -> tuple[MemoryDevice, PowerCutDevice]:
    inner = MemoryDevice(size, path="inner")
    inner.data[:] = b"o" * size
    return inner, PowerCutDevice(inner, sector=sector)


def test_writes_are_volatile_until_flushed_and_reads_see_them() -> None:
    inner, device = _device()
    device.write_sync(100, b"a" * 200)
    device.write_sync(150, b"b" * 100)  # overlaps the first: the later write wins
    device.zero_sync(240, 20)
    assert bytes(inner.data[:400]) == b"o" * 400  # nothing reached the media yet
    expected = b"o" * 100 + b"a" * 50 + b"b" * 90 + bytes(20) + b"a" * 40
    assert device.read_sync(0, 300) == expected
    assert device.pending_writes == 3
    device.flush_sync()
    assert bytes(inner.data[:300]) == expected
    assert device.pending_writes == 0
    stats = device.cut_statistics()
    assert (stats.writes, stats.zeros, stats.flushes, stats.pending) == (2, 1, 1, 0)


def test_async_api_behaves_like_the_sync_one() -> None:
    async def scenario() -> None:
        inner, device = _device()
        await device.write(4096, b"x" * 4096)
        await device.zero(4096, 10)
        assert await device.read(4096, 20) == bytes(10) + b"x" * 10
        assert inner.data[4096] == ord("o")
        await device.flush()
        assert bytes(inner.data[4096:4116]) == bytes(10) + b"x" * 10

    trio.run(scenario)


def test_drop_all_loses_every_unflushed_write_and_powers_off() -> None:
    inner, device = _device()
    device.write_sync(0, b"d" * 4096)
    device.flush_sync()
    device.write_sync(0, b"e" * 8192)
    report = device.cut(random.Random(1), "drop_all")
    assert (report.pending, report.landed, report.dropped, report.torn) == (1, 0, 1, 0)
    assert bytes(inner.data[:4096]) == b"d" * 4096
    assert bytes(inner.data[4096:8192]) == b"o" * 4096
    for operation in (
        lambda: device.read_sync(0, 1),
        lambda: device.write_sync(0, b"z"),
        lambda: device.flush_sync(),
        lambda: device.zero_sync(0, 1),
    ):
        with pytest.raises(DeviceError, match="power is off"):
            operation()


def test_random_subset_lands_whole_writes_in_any_order() -> None:
    outcomes = set()
    for seed in range(40):
        inner, device = _device()
        device.write_sync(0, b"1" * 4096)
        device.write_sync(0, b"2" * 4096)  # same place: after a cut, either may win
        device.write_sync(8192, b"3" * 4096)
        device.cut(random.Random(seed), "random_subset")
        first, third = bytes(inner.data[:4096]), bytes(inner.data[8192:12288])
        assert first in (b"o" * 4096, b"1" * 4096, b"2" * 4096)  # never a mix
        assert third in (b"o" * 4096, b"3" * 4096)
        outcomes.add(first[:1])
    # the older write can land last, over the newer one: no ordering without a flush
    assert outcomes == {b"o", b"1", b"2"}


def test_torn_writes_keep_a_prefix_of_whole_sectors() -> None:
    prefixes = set()
    for seed in range(60):
        inner, device = _device()
        new = b"".join(bytes([65 + i]) * 512 for i in range(8))
        device.write_sync(4096 + 512, new)  # 8 sectors starting at a sector boundary
        report = device.cut(random.Random(seed), "torn")
        landed = bytes(inner.data[4096 + 512 : 4096 + 512 + 4096])
        kept = next((k for k in range(9) if landed == new[: k * 512] + b"o" * (4096 - k * 512)),
                    None)
        assert kept is not None, f"seed {seed}: not a sector prefix"
        assert (0 < kept < 8) == (report.torn == 1)
        prefixes.add(kept)
    assert len(prefixes) > 4  # tears happen at many different sectors


def test_rail_cuts_every_disk_at_the_same_operation() -> None:
    rail = PowerRail(random.Random(3), "drop_all")
    inners = [MemoryDevice(8192, path=f"m{i}") for i in range(3)]
    devices = [PowerCutDevice(inner, rail=rail) for inner in inners]
    rail.arm(5)
    for device in devices:
        device.write_sync(0, b"w" * 10)  # operations 1-3
    devices[0].flush_sync()  # 4: durable on disk 0 only
    with pytest.raises(DeviceError):
        devices[1].flush_sync()  # 5: the power goes before it takes effect
    assert rail.off
    assert rail.cut_op == 5
    assert all(device.off for device in devices)
    assert [bytes(inner.data[:1]) for inner in inners] == [b"w", b"\0", b"\0"]
    assert [report.dropped for report in rail.reports] == [0, 1, 1]


# ---- the block model --------------------------------------------------------------------


def test_block_model_accepts_acked_or_newer_and_rejects_older_or_foreign() -> None:
    model = BlockModel(first=10, count=4)
    seq1, _ = model.begin(10 * BLOCK, BLOCK)
    model.end(seq1, True)
    token = model.flush_begin()
    seq2, _ = model.begin(10 * BLOCK, BLOCK)  # not covered by the flush that started before
    model.end(seq2, True)
    model.flush_end(token)
    seq3, _ = model.begin(10 * BLOCK, BLOCK)  # in flight at the cut
    model.end(seq3, False)

    assert model.check(10, pattern_block(10, seq1)).kind == "acked"
    assert model.check(10, pattern_block(10, seq2)).kind == "newer"
    assert model.check(10, pattern_block(10, seq3)).kind == "newer"
    assert model.check(10, bytes(BLOCK)).kind == "lost"
    assert model.check(10, pattern_block(11, seq1)).kind == "garbage"  # another block's data
    torn = pattern_block(10, seq1)[:2048] + pattern_block(10, seq2)[2048:]
    verdict = model.check(10, torn)
    assert verdict.kind == "garbage"
    assert f"seq {seq1} (s0-3) + seq {seq2} (s4-7)" in verdict.detail
    # a block never written reads zeros, or any version that was in flight
    assert model.check(11, bytes(BLOCK)).ok
    assert describe_block(12, bytes(BLOCK)) == "zeros"


def test_block_model_freezes_partly_written_blocks_until_acknowledged() -> None:
    model = BlockModel(first=0, count=4)
    seq, _ = model.begin(BLOCK, 2 * BLOCK)
    model.end(seq, True)
    assert not model.can_write(BLOCK + 100, 50)  # newest version of block 1 not acked
    model.flush_end(model.flush_begin())
    assert model.can_write(BLOCK + 100, 50)
    seq, _ = model.begin(BLOCK + 100, 50)
    model.end(seq, True)
    assert not model.can_write(BLOCK, BLOCK)  # frozen, even for a whole-block write
    assert model.can_write(2 * BLOCK, BLOCK)
    model.flush_end(model.flush_begin())
    assert model.can_write(BLOCK, BLOCK)


# ---- the pool helper --------------------------------------------------------------------


def test_crash_pool_reboot_keeps_flushed_data_and_drops_the_rest() -> None:
    async def scenario() -> None:
        rig = await crashsim.crash_pool(
            LayoutSpec("mirror", 1, copies=2, interleave=16384), disks=2
        )
        await rig.volume.write(0, b"kept" * 1024)
        await rig.volume.flush()
        await rig.volume.write(4096, b"lost" * 1024)
        pool, volume = await rig.reboot(random.Random(0), "drop_all")
        assert await volume.read(0, 4096) == b"kept" * 1024
        assert await volume.read(4096, 4096) == bytes(4096)
        assert pool.metadata.volumes[0].name == "vol"

    trio.run(scenario)


# ---- the harness against references, and its reproducibility ---------------------------


def test_harness_passes_a_disk_that_never_tears_a_block() -> None:
    layout = crashsim.REFERENCE_LAYOUTS["disk-4k"]
    for seed in range(6):
        trial = crashsim.run_trial(layout, seed, mode=crashsim.CUT_MODES[seed % 3])
        assert trial.survived, _explain([trial])
        assert trial.blocks_checked > 0


def test_harness_catches_a_disk_that_tears_sectors() -> None:
    layout = crashsim.REFERENCE_LAYOUTS["disk-512"]
    caught = []
    for seed in range(20):
        trial = crashsim.run_trial(layout, seed, mode="torn")
        assert {failure.kind for failure in trial.failures} <= {"garbage"}, _explain([trial])
        caught += [f for f in trial.failures if "(s0" in f.detail and ") + " in f.detail]
        if len(caught) >= 2:
            break
    assert len(caught) >= 2, "no torn block was detected in 20 torn power cuts"


def test_trials_are_reproducible_from_their_seed() -> None:
    layout = crashsim.LAYOUTS["parity-1"]
    first = crashsim.run_trial(layout, 7)
    again = crashsim.run_trial(layout, 7)
    assert first.image_digest == again.image_digest
    assert (first.cut_op, first.writes, first.flushes) == (again.cut_op, again.writes,
                                                           again.flushes)
    assert [str(f) for f in first.failures] == [str(f) for f in again.failures]


# ---- the crash campaign -----------------------------------------------------------------


@pytest.fixture(scope="module", params=LAYOUT_NAMES)
def campaign(request: pytest.FixtureRequest) -> CampaignRow:
    # Disks that write 4 KiB atomically (4Kn drives, image files on 4 KiB-page file systems):
    # then every block must read whole, old or new. Disks that tear inside a 4 KiB block
    # can leave a per-sector mix of an unacknowledged write (what such a disk does itself);
    # `tools/crashloop powercut --sector 512` shows that limit, and the README states it.
    return crashsim.run_campaign(
        request.param, CUTS_PER_LAYOUT, config=crashsim.TrialConfig(sector=4096)
    )


def _degraded(failure: crashsim.Failure) -> bool:
    return failure.phase.startswith("read without")


def _explain(trials: list[TrialResult], degraded: bool | None = None) -> str:
    """Per failing trial: its summary, first failures (all, or only those with / without
    disks missing), notes, and the command that replays it."""
    lines = []
    for trial in trials[:SHOWN_SEEDS]:
        failures = [f for f in trial.failures if degraded is None or _degraded(f) == degraded]
        lines.append(trial.summary())
        lines += [f"    {failure}" for failure in failures[:SHOWN_FAILURES]]
        if len(failures) > SHOWN_FAILURES:
            lines.append(f"    ... and {len(failures) - SHOWN_FAILURES} more")
        lines += [f"    note: {note}" for note in trial.notes[:2]]
        lines.append(f"    replay: tools/crashloop powercut --layouts {trial.layout} "
                     f"--seed {trial.seed} --cuts 1 -v")
    if len(trials) > SHOWN_SEEDS:
        lines.append(f"... and {len(trials) - SHOWN_SEEDS} more failing seeds")
    return "\n".join(lines)


def test_acknowledged_writes_survive_power_cuts(campaign: CampaignRow) -> None:
    """The pool opens, and with every disk present each block reads as its acknowledged
    version or a newer one; nothing fails or hangs before the cut."""
    failing = [
        trial for trial in campaign.results
        if any(not _degraded(f) for f in trial.failures)
    ]
    if failing:
        pytest.fail(
            f"{len(failing)} of {campaign.cuts} power cuts on {campaign.layout} broke "
            f"acknowledged data or the pool:\n" + _explain(failing, degraded=False),
            pytrace=False,
        )


def test_redundancy_agrees_after_power_cuts(campaign: CampaignRow) -> None:
    """With disks up to the layout's tolerance lost after the cut (and the remount), every
    block that passed with all disks still reads, as the same version (mirror copies equal,
    parity consistent: no write hole)."""
    spec = crashsim.LAYOUTS[campaign.layout].spec
    assert spec is not None
    if spec.tolerance == 0:
        pytest.skip("no redundancy to check")
    failing = [
        trial for trial in campaign.results
        if any(_degraded(f) for f in trial.failures)
    ]
    if failing:
        pytest.fail(
            f"{len(failing)} of {campaign.cuts} power cuts on {campaign.layout} left copies "
            f"or parity that disagree:\n" + _explain(failing, degraded=True),
            pytrace=False,
        )


# ---- targeted cuts: right after each ordered step ------------------------------------
#
# Random cuts rarely land in the few operations where an ordering bug shows (a map durable
# before the zeroing of its extents, an intent record clearing a region before its data is
# durable). tests/crash_replay.py records every device operation of a scripted run that
# goes through each ordered step, and checks the disks a cut right after each write, zero
# and flush leaves (see its docstring for what lands, and why that equals a rerun cut by
# the rail).

TARGETED_STEPS = {"extent zeroing", "metadata", "intent record", "data", "checksums", "flush"}
SHOWN_CUTS = 6


@dataclass
class TargetedRun:
    recording: crash_replay.Recording
    cuts: list[crash_replay.Cut] = field(repr=False)
    results: list[tuple[crash_replay.Cut, TrialResult]] = field(repr=False)


@pytest.fixture(scope="module", params=LAYOUT_NAMES)
def targeted(request: pytest.FixtureRequest) -> TargetedRun:
    recording = crash_replay.record(request.param)
    cuts = crash_replay.targeted_cuts(recording)
    return TargetedRun(recording, cuts, crash_replay.check_cuts(recording, cuts))


def _explain_cuts(results: list[tuple[crash_replay.Cut, TrialResult]], degraded: bool) -> str:
    lines = []
    for cut, trial in results[:SHOWN_CUTS]:
        failures = [f for f in trial.failures if _degraded(f) == degraded]
        lines.append(cut.describe())
        lines += [f"    [{f.phase}] {f.kind}{'' if f.block is None else f' block {f.block}'}: "
                  f"{f.detail}" for f in failures[:SHOWN_FAILURES]]
        if len(failures) > SHOWN_FAILURES:
            lines.append(f"    ... and {len(failures) - SHOWN_FAILURES} more")
    if len(results) > SHOWN_CUTS:
        lines.append(f"... and {len(results) - SHOWN_CUTS} more failing cuts")
    return "\n".join(lines)


def test_targeted_cuts_follow_every_ordered_step(targeted: TargetedRun) -> None:
    """The scripted run goes through every ordered step and a cut follows each; the log is
    whole (replayed to its end it gives the disks the run left); the cleaner cleared
    regions holding writes that no volume flush had made durable (the window of a
    clearing record that lands before that data)."""
    recording = targeted.recording
    difference = crash_replay.first_difference(crash_replay.replayed_end(recording),
                                               recording.final)
    assert difference is None, f"the log replayed to its end: {difference}"
    cut_steps = {cut.after.area for cut in targeted.cuts}
    assert cut_steps >= TARGETED_STEPS, f"no cut after: {TARGETED_STEPS - cut_steps}"
    assert {cut.mode for cut in targeted.cuts} == {"flushed", "alone"}
    writes_since_ack = crash_replay.unflushed_clearings(recording)
    assert writes_since_ack, "the cleaner never cleared a region with unflushed writes in it"


def test_acknowledged_writes_survive_targeted_cuts(targeted: TargetedRun) -> None:
    """After each targeted cut the pool opens and every block reads as its acknowledged
    version or a newer one (with every disk present)."""
    failing = [(cut, trial) for cut, trial in targeted.results
               if any(not _degraded(f) for f in trial.failures)]
    if failing:
        pytest.fail(
            f"{len(failing)} of {len(targeted.results)} targeted cuts on "
            f"{targeted.recording.layout.name} broke acknowledged data or the pool:\n"
            + _explain_cuts(failing, degraded=False),
            pytrace=False,
        )


def test_redundancy_agrees_after_targeted_cuts(targeted: TargetedRun) -> None:
    """After each targeted cut and the remount, losing disks (each one alone after a cut
    that follows a flush) still reads every block as the same version."""
    spec = targeted.recording.layout.spec
    assert spec is not None
    if spec.tolerance == 0:
        pytest.skip("no redundancy to check")
    failing = [(cut, trial) for cut, trial in targeted.results
               if any(_degraded(f) for f in trial.failures)]
    if failing:
        pytest.fail(
            f"{len(failing)} of {len(targeted.results)} targeted cuts on "
            f"{targeted.recording.layout.name} left copies or parity that disagree:\n"
            + _explain_cuts(failing, degraded=True),
            pytrace=False,
        )


def test_a_replayed_cut_is_the_cut_the_rail_makes() -> None:
    """The replay is sound: rerunning the script with the rail armed to cut as operation
    n + 1 starts ("drop_all") takes the same operations up to n, and leaves disks byte for
    byte equal to the log replayed up to n."""
    recording = crash_replay.record("parity-1")

    def shape(ops: list[crash_replay.Op]) -> list[tuple[object, ...]]:
        # Labels and metadata hold random UUIDs and times: their length varies.
        return [(op.number, op.disk, op.kind, op.offset, op.area,
                 0 if op.area in ("label", "metadata") else op.length) for op in ops]

    chosen: dict[str, crash_replay.Op] = {}
    for cut in crash_replay.targeted_cuts(recording):
        chosen.setdefault(cut.after.area, cut.after)  # the first cut after each kind of step
    assert set(chosen) >= TARGETED_STEPS
    for op in chosen.values():
        rerun = crash_replay.record("parity-1", cut_after=op.number)
        assert rerun.ops[-1].number == op.number, op.describe()
        assert shape(rerun.ops) == shape(recording.ops[: len(rerun.ops)]), op.describe()
        replayed = crash_replay.crash_image(rerun, crash_replay.Cut(rerun.ops[-1], "flushed"))
        difference = crash_replay.first_difference(replayed, rerun.final)
        assert difference is None, f"cut right after {op.describe()}: {difference}"


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUT_NAMES)
def test_targeted_cuts_longer_run_every_loss(layout: str) -> None:
    """The longer script (the cleaner at work twice, more overwrites), each cut checked
    with every set of disks up to the tolerance lost: the thorough run, minutes long."""
    recording = crash_replay.record(layout, longer=True)
    results = crash_replay.check_cuts(recording, crash_replay.targeted_cuts(recording),
                                      every_loss=True)
    failing = [(cut, trial) for cut, trial in results if trial.failures]
    if failing:
        pytest.fail(
            f"{len(failing)} of {len(results)} targeted cuts on {layout} failed:\n"
            + _explain_cuts(failing, degraded=False) + "\n"
            + _explain_cuts(failing, degraded=True),
            pytrace=False,
        )
