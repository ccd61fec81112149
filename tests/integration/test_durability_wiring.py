"""Wiring of durability on real mounts: the pieces exist and are unit-tested, these tests
prove the running daemon actually connects them.

* After `kill -9` with regions dirty in the write-intent log, a remount with no I/O at all
  resyncs them in the background and the durable log drains to zero (the resync task is
  started at mount, not only on demand by I/O to a pending region).
* `fsync`/`fdatasync` of a volume file flushes every disk of the pool. A kill -9 cannot show
  a missing flush (the page cache survives the daemon), so the disks' flush counters are
  read through the fault-injection layer's `fault_list` request, the one place the daemon
  reports per-disk device statistics (the pool is mounted with --allow-fault-injection).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from blockspace.admin.registry import Registry
from blockspace.errors import FormatError
from blockspace.ondisk.label import INTENT_SLOT_SIZE, LABEL_SIZE, decode_label
from blockspace.pool.intent import Key, decode_intent
from blockspace.service import control

from .helpers import BlockspaceEnv, MiB, missing_prerequisites, wait_until

MISSING = missing_prerequisites()
pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(MISSING is not None, reason=MISSING or ""),
]

DRAIN_DEADLINE = 60.0  # seconds; the cleaner runs every 5 s, resyncing a few regions takes <1 s


def durable_intent(images: list[Path]) -> tuple[int, set[Key]]:
    """The newest valid write-intent record on any of the pool's image files, read from the
    files themselves (what a mount after a power cut would find): (generation, keys)."""
    best: tuple[int, set[Key]] = (0, set())
    for image in images:
        with open(image, "rb") as handle:
            label = decode_label(os.pread(handle.fileno(), LABEL_SIZE, 0))
            assert label is not None, f"{image} carries no label"
            for slot in (0, 1):
                raw = os.pread(handle.fileno(), INTENT_SLOT_SIZE,
                               label.geometry.intent_slot_offset(slot))
                try:
                    generation, keys, _ = decode_intent(raw, label.pool_uuid)
                except FormatError:
                    continue  # a slot never written (or torn): the other one counts
                if generation > best[0]:
                    best = (generation, keys)
    return best


def log_size(env: BlockspaceEnv, pool: str) -> int:
    try:
        return (env.state_dir / "log" / f"{pool}.log").stat().st_size
    except FileNotFoundError:
        return 0


def log_since(env: BlockspaceEnv, pool: str, offset: int) -> str:
    with open(env.state_dir / "log" / f"{pool}.log", "rb") as handle:
        handle.seek(offset)
        return handle.read().decode(errors="replace")


def test_dirty_regions_drain_after_kill_9_with_no_io(blockspace_env: BlockspaceEnv) -> None:
    """Regions a kill -9 left dirty are resynced by the mount itself: with nobody touching
    the volume, the durable intent log goes back to zero entries, and the acknowledged data
    reads back intact."""
    env = blockspace_env
    images = env.make_images([160 * MiB] * 3)
    env.create_pool("wi", images, slab_size="16M")
    env.create_volume("wi", "vol", "96M", "mirror", "--copies", "2")
    mountpoint, pid = env.mount_pool("wi")

    # Writes into regions of three slabs, fsynced (acknowledged), then kill -9 at once: the
    # cleaner only clears a region idle for 10 s, so they are all still dirty on the disks.
    payload = {offset: os.urandom(64 * 1024) for offset in (0, 8 * MiB, 20 * MiB, 40 * MiB)}
    fd = os.open(mountpoint / "vol", os.O_RDWR)
    try:
        for offset, data in payload.items():
            assert os.pwrite(fd, data, offset) == len(data)
        os.fsync(fd)
    finally:
        os.close(fd)  # before the kill: a close on a dead mount fails with ENOTCONN
    env.kill_daemon(pid)
    generation, dirty = durable_intent(images)
    assert dirty, f"premise: the writes left no dirty region on the disks (gen {generation})"

    env.fusermount_lazy(mountpoint)
    log_start = log_size(env, "wi")
    mountpoint, pid = env.mount_pool("wi")  # and then no I/O at all until the log drains

    drained = wait_until(lambda: not durable_intent(images)[1], DRAIN_DEADLINE, interval=0.2)
    log = log_since(env, "wi", log_start)
    assert drained, (
        f"{len(durable_intent(images)[1])} of {len(dirty)} dirty regions still in the "
        f"write-intent log {DRAIN_DEADLINE:g}s after a remount with no I/O; daemon log:\n{log}"
    )
    # It drained because the regions were resynced, not because the mount forgot them.
    started = re.search(r"volume vol: resyncing (\d+) dirty regions", log)
    assert started is not None, log
    assert int(started.group(1)) == len(dirty), log
    assert "volume vol: resync done" in log, log

    fd = os.open(mountpoint / "vol", os.O_RDONLY)
    try:
        for offset, data in payload.items():
            assert os.pread(fd, len(data), offset) == data, f"acknowledged data at {offset}"
    finally:
        os.close(fd)
    env.unmount_pool(mountpoint, pid)
    assert durable_intent(images)[1] == set()  # a clean stop leaves nothing to resync


def flush_counts(socket_path: Path) -> dict[int, int]:
    """Disk id -> flushes its device has completed, as the daemon reports them (`fault
    list`). Asked in-process, not through the CLI: a child forked while the volume file is
    open closes its copy of the fd, and every close sends FUSE a flush of its own."""
    return {disk["id"]: disk["statistics"]["flushes"]
            for disk in control.request(socket_path, "fault_list")}


def test_fsync_of_a_volume_file_flushes_every_disk(blockspace_env: BlockspaceEnv) -> None:
    """fsync and fdatasync of the volume file each flush every disk of the pool (parity 2+1
    on three disks: each disk holds a column of the written slab)."""
    env = blockspace_env
    images = env.make_images([96 * MiB] * 3)
    env.create_pool("fl", images, slab_size="16M")
    env.create_volume("fl", "vol", "32M", "parity", "--parity", "1")
    mountpoint, pid = env.mount_pool("fl", "--allow-fault-injection")
    socket_path = Registry(env.state_dir).socket_path("fl")

    fd = os.open(mountpoint / "vol", os.O_RDWR)
    try:
        for sync in (os.fsync, os.fdatasync):
            # direct_io: the write reaches the daemon (and its intent record and slab
            # allocation their own flushes) before pwrite returns, so from here to the
            # last count only the sync can flush (the cleaner waits 10 s of idleness).
            assert os.pwrite(fd, os.urandom(256 * 1024), 0) == 256 * 1024
            before = flush_counts(socket_path)
            assert len(before) == 3, before
            assert flush_counts(socket_path) == before  # counting alone flushes nothing
            sync(fd)
            after = flush_counts(socket_path)
            unflushed = sorted(d for d in before if after[d] <= before[d])
            assert not unflushed, (
                f"{sync.__name__} returned without flushing disks {unflushed}: "
                f"flushes before {before}, after {after}"
            )
    finally:
        os.close(fd)
    env.unmount_pool(mountpoint, pid)
