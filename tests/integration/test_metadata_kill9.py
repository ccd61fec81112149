"""kill -9 of a real format-2 daemon in the middle of its metadata commits (issue 16, Tests).

A pool with the smallest metadata area its capacity allows (64 KiB slots: a checkpoint and
room for a handful of 4 KiB records), so the journal fills and the whole state is
checkpointed into the other slot every few commits (in format 2 that checkpoint is the
compaction: the journal starts again after it). A writer process fills two thin mirror
volumes through their FUSE files, one new slab of each per step, written at once (two
threads), each write fsynced: every acknowledged write sits in a slab just allocated, and the
two allocations of a step meet in the pool's group commit.

The daemon is killed at points chosen by what the image files hold, not by sleeps: with
one disk made slow (`fault inject --latency`), a commit lands on the fast disks first, and
the test reads the slots from the images until it sees a *record* (or a *checkpoint*) on
the fast disks that the slow one does not have yet; and once right after an acknowledged
step, between commits. After each kill the pool is mounted again and every write ever
acknowledged must read back; at the end a scrub finds nothing and every disk is online.
After every acknowledged step, the images' newest metadata must also map the slab it
wrote: an acknowledgement that ran ahead of its commit is caught the moment it happens.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from blockspace.errors import FormatError
from blockspace.ondisk.journal import index_slot, replay
from blockspace.ondisk.label import LABEL_SIZE, DiskLabel, decode_label
from blockspace.pool.metastore import MIN_RESERVE

from .helpers import (
    BlockspaceEnv,
    InProcessCLI,
    KiB,
    MiB,
    missing_prerequisites,
    wait_until,
)

MISSING = missing_prerequisites()
pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(MISSING is not None, reason=MISSING or ""),
]

SLAB = MiB
WRITE = 64 * KiB
SLOW = "1500ms"  # the slow disk's added latency: a window of seconds per commit
SLOW_DISK = 2
VOLUMES = ("a", "b")  # written at once: their allocations meet in shared (group) commits
STEP_TIMEOUT = 60.0  # one step, slow disk included: a few requests of 1.5 s each

WRITER = r"""
import hashlib, os, sys, threading
fds = [os.open(path, os.O_RDWR) for path in sys.argv[1:]]
done = []
def write(fd, index):
    data = hashlib.blake2b(str(index).encode(), digest_size=64).digest() * 1024
    os.pwrite(fd, data, index * SLAB + (index * 4096) % SLAB)
    os.fsync(fd)
    done.append(fd)
for line in sys.stdin:
    index = int(line)
    threads = [threading.Thread(target=write, args=(fd, index)) for fd in fds]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if len(done) != len(fds):
        sys.exit(1)  # not acknowledged: a write or its fsync failed
    done.clear()
    print(index, flush=True)
""".replace("SLAB", str(SLAB))


def expected(index: int) -> tuple[int, bytes]:
    """Where the writer puts step `index`'s data, and the data."""
    data = hashlib.blake2b(str(index).encode(), digest_size=64).digest() * (WRITE // 64)
    return index * SLAB + (index * 4096) % SLAB, data


# ---- what the image files hold ------------------------------------------------------------


@dataclass(frozen=True)
class SlotView:
    slot: int  # the slot holding the disk's newest generation
    base: int  # its checkpoint's generation
    generation: int
    tail: int


def read_label(image: Path) -> DiskLabel:
    with open(image, "rb") as handle:
        label = decode_label(handle.read(LABEL_SIZE))
    assert label is not None, f"{image} carries no label"
    return label


def slot_reader(image: Path, label: DiskLabel, slot: int) -> Callable[[int, int], bytes]:
    start = label.geometry.meta_slot_offset(slot)
    size = label.geometry.meta_slot_size

    def read(offset: int, length: int) -> bytes:
        length = max(0, min(length, size - offset))
        with open(image, "rb") as handle:
            return os.pread(handle.fileno(), length, start + offset) if length else b""

    return read


def newest(image: Path) -> tuple[SlotView, Any]:
    """The newest valid slot of one image (as a mount would index it) and its index."""
    label = read_label(image)
    best: tuple[SlotView, Any] | None = None
    for slot in (0, 1):
        try:
            index = index_slot(slot_reader(image, label, slot), label.geometry.meta_slot_size,
                               label.pool_uuid)
        except FormatError:
            continue
        view = SlotView(slot, index.checkpoint.generation, index.generation, index.tail)
        if best is None or (view.generation, slot) > (best[0].generation, best[0].slot):
            best = (view, index)
    assert best is not None, f"{image}: no valid metadata slot"
    return best


def views(images: list[Path]) -> list[SlotView]:
    return [newest(image)[0] for image in images]


def mapped_slabs(image: Path, volume: str) -> set[int]:
    """The slabs of `volume` that the image's newest metadata maps."""
    label = read_label(image)
    view, index = newest(image)
    md = replay(slot_reader(image, label, view.slot), index, label.geometry.meta_slot_size,
                label.pool_uuid)
    return {i for v in md.volumes if v.name == volume for i in v.slabs}


# ---- the writer -----------------------------------------------------------------------------


class Writer:
    """A process writing one step at a time into the volume file: send an index, get it
    back once it is written and fsynced (acknowledged)."""

    def __init__(self, paths: list[Path]) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", WRITER, *map(str, paths)], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def send(self, index: int) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(f"{index}\n")
        self.process.stdin.flush()

    def wait_ack(self, index: int) -> None:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()  # the step's I/O is bounded by its timeouts
        assert line.strip() == str(index), (line, self.stop())

    def stop(self) -> str:
        """End the writer (it lost its daemon, or the test is done); its stderr."""
        process = self.process
        assert process.stdin is not None
        assert process.stdout is not None
        assert process.stderr is not None
        if process.stdout.closed:
            return ""  # stopped already
        with contextlib.suppress(BrokenPipeError):
            process.stdin.close()  # its end of input: a live writer exits
        with contextlib.suppress(BrokenPipeError):
            process.stdin.close()  # a failed flush leaves it open: now without buffer
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
        errors = process.stderr.read()
        process.stderr.close()
        process.stdout.close()
        return errors


# ---- the test ---------------------------------------------------------------------------------


class Run:
    def __init__(self, env: BlockspaceEnv, bs: InProcessCLI, images: list[Path]) -> None:
        self.env = env
        self.bs = bs
        self.images = images
        self.acknowledged: list[int] = []
        self.next_index = 0
        self.slot_size = read_label(images[0]).geometry.meta_slot_size
        self.mountpoint = Path()
        self.pid = 0
        self.writer: Writer | None = None

    def mount(self) -> None:
        self.mountpoint, self.pid = self.env.mount_pool("crash", "--allow-fault-injection")
        self.check_acknowledged()
        self.writer = Writer([self.mountpoint / name for name in VOLUMES])

    def check_acknowledged(self) -> None:
        lost = []
        for name in VOLUMES:
            fd = os.open(self.mountpoint / name, os.O_RDONLY)
            try:
                for index in self.acknowledged:
                    offset, data = expected(index)
                    if os.pread(fd, len(data), offset) != data:
                        lost.append((name, index))
            finally:
                os.close(fd)
        assert not lost, (f"acknowledged writes of steps {lost} (of {len(self.acknowledged)}) "
                          f"did not survive the kill; daemon log:\n"
                          f"{self.env.daemon_log('crash')}")

    def step(self) -> None:
        """One acknowledged step at full speed, checked against the images."""
        assert self.writer is not None
        index = self.next_index
        self.writer.send(index)
        self.writer.wait_ack(index)
        self.acknowledged.append(index)
        self.next_index += 1
        for image in self.images:  # each disk in service holds the commits that mapped it
            for name in VOLUMES:
                assert index in mapped_slabs(image, name), (
                    f"step {index} acknowledged while {image.name}'s metadata does not map "
                    f"its slab of volume {name}")

    def next_is_checkpoint(self) -> bool:
        view = views(self.images)[0]
        return view.tail + 4096 + MIN_RESERVE > self.slot_size

    def kill_in_flight(self, kind: str) -> None:
        """Slow one disk, and kill the daemon once a commit of `kind` ("record" or
        "checkpoint") is on the fast disks and not yet on the slow one."""
        assert self.writer is not None
        code, _, err = self.bs("fault", "inject", "crash", str(SLOW_DISK), "--latency", SLOW)
        assert code == 0, err
        for _ in range(12):
            slow_before = views(self.images)[SLOW_DISK].generation
            index = self.next_index
            self.writer.send(index)
            caught: list[str] = []
            assert wait_until(lambda b=slow_before, c=caught: self.in_flight(b, c),
                              STEP_TIMEOUT, interval=0.02), (
                f"step {index}: no commit seen in flight; {views(self.images)}")
            if caught[0] == kind:
                self.kill()
                return
            self.writer.wait_ack(index)  # not the kind we want: let it finish
            self.acknowledged.append(index)
            self.next_index += 1
        raise AssertionError(f"no {kind} caught in flight in 12 slow steps")

    def in_flight(self, slow_before: int, caught: list[str]) -> bool:
        """Whether a commit is on the fast disks and not on the slow one (still at
        generation `slow_before`); its kind goes to `caught`."""
        now = views(self.images)
        fast, slow = now[:SLOW_DISK], now[SLOW_DISK]
        if slow.generation != slow_before or any(v.generation <= slow_before for v in fast):
            return False
        caught.append("checkpoint" if fast[0].slot != slow.slot else "record")
        return True

    def kill(self) -> None:
        self.env.kill_daemon(self.pid)
        assert self.writer is not None
        self.writer.stop()  # its step was never acknowledged: it died with the mount
        self.writer = None
        self.env.fusermount_lazy(self.mountpoint)


def test_kill_9_during_commits_checkpoints_and_between_them(
    blockspace_env: BlockspaceEnv, capsys: pytest.CaptureFixture[str]
) -> None:
    env = blockspace_env
    bs = InProcessCLI(env, capsys)
    images = env.make_images([160 * MiB] * 3)
    env.cli_json("pool", "create", "crash", *map(str, images), "--slab-size", "1M",
                 "--metadata-size", "64K")
    for name in VOLUMES:
        env.create_volume("crash", name, "100M", "mirror", "--copies", "2")
    run = Run(env, bs, images)
    try:
        assert run.slot_size == 64 * KiB

        # 1. A record on two of the three disks (a commit cut short).
        run.mount()
        for _ in range(2):
            run.step()
        run.kill_in_flight("record")

        # 2. A checkpoint on two of the three disks (the journal was full: the slot switch).
        run.mount()
        slots_seen = {views(images)[0].slot}
        while not run.next_is_checkpoint():
            run.step()
        run.kill_in_flight("checkpoint")

        # 3. Between commits, right after the step that follows a checkpoint: nothing in flight,
        # the new slot's journal holding a single record.
        run.mount()
        start = views(images)[0].slot
        while views(images)[0].slot == start:
            run.step()
            slots_seen.add(views(images)[0].slot)
        run.step()
        run.kill()

        # 4. Several journals' worth of steps at full speed, then a kill mid-record again.
        run.mount()
        for _ in range(12):
            run.step()
            slots_seen.add(views(images)[0].slot)
        run.kill_in_flight("record")

        run.mount()
        assert slots_seen == {0, 1}, "premise: the journal filled and was checkpointed"
        scrub = env.cli_json("scrub", "crash", "--wait")
        assert scrub["state"] == "done", scrub
        report = scrub["report"]
        assert (report["checksum_errors"], report["mismatches"], report["unrecoverable"]) == \
            (0, 0, []), report
        status = env.status("crash")
        assert status["metadata"]["error"] == "", status["metadata"]
        assert wait_until(
            lambda: all(d["state"] == "online" for d in env.status("crash")["disks"]), 60,
        ), env.status("crash")["disks"]
        assert run.writer is not None
        run.step()  # and it still takes writes
        run.writer.stop()
        env.unmount_pool(run.mountpoint, run.pid)
        assert len(run.acknowledged) >= 20, run.acknowledged
    finally:
        if run.writer is not None:  # a failed test leaves no writer holding the mount
            run.writer.stop()
