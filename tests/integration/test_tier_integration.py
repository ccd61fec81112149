"""Storage tiers on real FUSE mounts: media classes, a tiered volume with an ssd mirror tier
over an hdd parity tier (mirror-accelerated parity), heat that drives promotions and
survives a remount, pins, `tier status`, and a `kill -9` of the daemon in the middle of
a pass of moves while writes race it."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from integration.helpers import (
    BlockspaceEnv,
    InProcessCLI,
    KiB,
    MiB,
    check_filesystem,
    hash_tree,
    missing_prerequisites,
    wait_exited,
    wait_until,
    write_random_files,
)

MISSING = missing_prerequisites()
pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(MISSING is not None, reason=MISSING or ""),
]

UNIT = 256 * KiB


def make_tiered_pool(env: BlockspaceEnv, bs: InProcessCLI) -> None:
    images = env.make_images([96 * MiB] * 5)
    bs.json("pool", "create", "tank", str(images[0]), str(images[1]), "--media", "ssd",
            "--slab-size", "8M")
    bs.json("disk", "add", "tank", *map(str, images[2:]), "--media", "hdd")
    volume = bs.json("volume", "create", "tank", "fast", "--tier", "ssd:8M:mirror-2",
                     "--tier", "hdd:64M:parity-1", "--tier-unit", "256K")
    assert volume["resiliency"].startswith("tiered: ssd mirror-2 8M + hdd parity-1")


def pread_all(path: Path, size: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, size, 0)
    finally:
        os.close(fd)


def test_media_is_detected_for_block_devices(
    blockspace_env: BlockspaceEnv, capsys: pytest.CaptureFixture[str]
) -> None:
    env = blockspace_env
    bs = InProcessCLI(env, capsys)
    image = env.make_images([64 * MiB])[0]
    loop = env.attach_loop(image, pool_disk=True)
    rotational = Path(f"/sys/block/{os.path.basename(loop)}/queue/rotational").read_text()
    status = bs.json("pool", "create", "tank", loop, "--slab-size", "8M")
    assert status["disks"][0]["media"] == ("hdd" if rotational.strip() == "1" else "ssd")
    code, out, _ = bs("pool", "status", "tank")
    assert code == 0
    assert "media" in out


def test_tiered_volume_on_a_real_mount(
    blockspace_env: BlockspaceEnv, capsys: pytest.CaptureFixture[str]
) -> None:
    env = blockspace_env
    bs = InProcessCLI(env, capsys)
    make_tiered_pool(env, bs)
    code, _, err = bs("volume", "create", "tank", "bad", "--tier", "ssd:8M:mirror-3",
                      "--tier", "hdd:8M:parity-1")
    assert code != 0
    assert "ssd tier" in err
    media = {d["id"]: d["media"] for d in bs.json("pool", "status", "tank")["disks"]}
    assert media == {0: "ssd", 1: "ssd", 2: "hdd", 3: "hdd", 4: "hdd"}

    rng = random.Random(7)
    data = bytearray(rng.randbytes(24 * MiB))
    mountpoint, pid = bs.mount()
    volume = mountpoint / "fast"
    assert sorted(os.listdir(mountpoint)) == ["fast"]  # the tiers themselves are hidden
    fd = os.open(volume, os.O_RDWR)
    try:
        for offset in range(0, len(data), 4 * MiB):
            os.pwrite(fd, data[offset : offset + 4 * MiB], offset)
        os.fsync(fd)
        status = bs.json("tier", "status", "tank", "fast")[0]
        assert status["write_back"] is True
        assert status["counters"]["write_allocations"] > 0  # writes landed on the ssd tier
        assert status["counters"]["writes_bypassed"] > 0  # and went on when it was full
        hot = [60, 61, 62, 70, 80]  # units 20+ MiB in: the writes left them on the hdd tier
        for _ in range(10):
            for unit in hot:
                os.pread(fd, 4096, unit * UNIT)
        report = bs.json("tier", "optimize", "tank", "fast")
        assert report["failed"] == 0
        assert report["promoted"] >= len(hot)
        before = bs.json("tier", "status", "tank", "fast")[0]["counters"]
        for unit in hot:
            os.pread(fd, 4096, unit * UNIT)
        after = bs.json("tier", "status", "tank", "fast")[0]
        assert after["counters"]["ssd_hits"] - before["ssd_hits"] == len(hot)
        assert after["ssd"]["dirty"] == 0
        assert after["hit_ratio"] is not None
        assert after["ssd"]["used"] + after["ssd"]["free"] == 8 * MiB
        # pin the start of the volume to hdd and a cold range to ssd
        bs.json("tier", "pin", "tank", "fast", "--tier", "ssd", "--offset", "40M",
                "--length", "1M")
        code, _, err = bs("tier", "pin", "tank", "fast", "--tier", "hdd", "--offset", "40M")
        assert code != 0
        assert "overlaps" in err
        bs.json("tier", "optimize", "tank", "fast")
        before = bs.json("tier", "status", "tank", "fast")[0]["counters"]
        os.pread(fd, 1 * MiB, 40 * MiB)
        after = bs.json("tier", "status", "tank", "fast")[0]
        reads = after["counters"]["reads"] - before["reads"]
        assert after["counters"]["ssd_hits"] - before["ssd_hits"] == reads, (reads, after)
        assert after["pins"] == [{"offset": 40 * MiB, "length": MiB, "tier": "ssd"}]
        assert pread_all(volume, len(data)) == data
        code, _, err = bs("scrub", "tank", "fast")
        assert code != 0
        assert "scrub its tiers 'fast.ssd' and 'fast.hdd'" in err
    finally:
        os.close(fd)
    code, out, _ = bs("tier", "status", "tank", "fast", "--png", str(env.root / "heat.png"))
    assert code == 0
    assert "hit ratio" in out
    assert (env.root / "heat.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bs.unmount(mountpoint, pid)

    offline = bs.json("tier", "status", "tank", "fast")[0]
    heat = offline["heat_map"]["heat"]
    assert heat[60 * 64 // 256] > 0  # the heat of the hot units was saved at unmount
    assert offline["pins"] == after["pins"]
    mountpoint, pid = bs.mount()
    assert pread_all(mountpoint / "fast", len(data)) == data
    code, _, err = bs("volume", "delete", "tank", "fast.hdd")
    assert code != 0
    assert "tier of tiered volume" in err
    bs.json("volume", "delete", "tank", "fast")  # through the daemon, its optimizer stopped
    assert os.listdir(mountpoint) == []
    bs.unmount(mountpoint, pid)
    assert all(d["free_bytes"] == d["extents"] * 8 * MiB
               for d in bs.json("pool", "status", "tank")["disks"])


def test_sigkill_in_the_middle_of_moves_keeps_every_acknowledged_byte(
    blockspace_env: BlockspaceEnv, capsys: pytest.CaptureFixture[str]
) -> None:
    env = blockspace_env
    bs = InProcessCLI(env, capsys)
    make_tiered_pool(env, bs)
    rng = random.Random(11)
    model = bytearray(rng.randbytes(32 * MiB))
    mountpoint, pid = bs.mount("--allow-fault-injection")
    volume = mountpoint / "fast"
    fd = os.open(volume, os.O_RDWR)
    hot = list(range(100, 124))  # 24 units on the hdd tier, made hot
    # The writer overwrites every other hot unit. In write-back a write brings its unit to
    # the ssd tier itself, so a writer quicker than the pass (a loaded machine) left the
    # promotions nothing to do and the wait below timed out; the units it does not touch
    # are promoted in any case, the ones it does race their promotions.
    overwritten = hot[::2]
    for offset in range(0, len(model), 4 * MiB):
        os.pwrite(fd, model[offset : offset + 4 * MiB], offset)
    os.fsync(fd)
    for _ in range(8):
        for unit in hot:
            os.pread(fd, 4096, unit * UNIT)
    # Slow ssd disks: each move takes a while, so the kill lands inside the pass.
    for disk in ("0", "1"):
        bs.json("fault", "inject", "tank", disk, "--latency", "15ms")
    optimize = subprocess.Popen(
        [sys.executable, "-m", "blockspace", "--state-dir", str(env.state_dir), "tier",
         "optimize", "tank", "fast", "--rate", "4M"],  # slow: still moving at the kill
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    stop = threading.Event()
    pending: list[tuple[int, bytes]] = []  # a write not (yet) acknowledged
    acked = [0]  # writes acknowledged so far, under `progress`
    progress = threading.Condition()

    def writer() -> None:
        """Overwrite the units being moved, each write acknowledged by fsync."""
        wrng = random.Random(12)
        while not stop.is_set():
            unit = wrng.choice(overwritten)
            offset = unit * UNIT + wrng.randrange(0, UNIT - 64 * KiB, 4096)
            chunk = wrng.randbytes(64 * KiB)
            pending[:] = [(offset, chunk)]
            try:
                os.pwrite(fd, chunk, offset)
                os.fsync(fd)
            except OSError:
                return
            model[offset : offset + len(chunk)] = chunk
            pending.clear()
            with progress:
                acked[0] += 1
                progress.notify_all()

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        def promoting() -> bool:
            """The pass demotes first (24 cold units make room): wait for its promotions,
            the moves that copy units the writer is overwriting."""
            return bs.json("tier", "status", "tank", "fast")[0]["counters"]["promotions"] >= 2

        assert wait_until(promoting, 60, interval=0.05), env.daemon_log("tank")
        # The kill lands while writes race the moves: two more acknowledged after they began.
        with progress:
            seen = acked[0]
            assert progress.wait_for(lambda: acked[0] >= seen + 2, timeout=60), (
                "the writer stopped", env.daemon_log("tank"))
        os.kill(pid, signal.SIGKILL)
        assert wait_exited(pid, 30)
    finally:
        stop.set()
        thread.join(30)
        with contextlib.suppress(OSError):  # ENOTCONN once the daemon is dead
            os.close(fd)
        # the pass was cut short by the kill (it reports a lost daemon, not a result)
        assert optimize.wait(60) != 0
    env.fusermount_lazy(mountpoint)

    mountpoint, pid = bs.mount()
    got = bytearray(pread_all(mountpoint / "fast", len(model)))
    for offset, chunk in pending:  # unacknowledged: old or new, nothing else
        new = got[offset : offset + len(chunk)] == chunk
        old = got[offset : offset + len(chunk)] == model[offset : offset + len(chunk)]
        assert new or old
        model[offset : offset + len(chunk)] = got[offset : offset + len(chunk)]
    assert got == model
    report = bs.json("tier", "optimize", "tank", "fast")
    assert report["failed"] == 0
    assert pread_all(mountpoint / "fast", len(model)) == model
    scrub = bs.json("scrub", "tank", "--wait")
    assert scrub["report"]["unrecoverable"] == []
    assert scrub["report"]["checksum_errors"] == 0
    bs.unmount(mountpoint, pid)


def test_ext4_on_a_tiered_volume(
    blockspace_env: BlockspaceEnv, capsys: pytest.CaptureFixture[str]
) -> None:
    env = blockspace_env
    bs = InProcessCLI(env, capsys)
    make_tiered_pool(env, bs)
    mountpoint, pid = bs.mount()
    loop = env.attach_loop(mountpoint / "fast")
    env.mkfs("ext4", loop)
    fs = env.mount_fs(loop, "fs", "ext4")
    files = {"a.bin": 3 * MiB + 5, "dir/b.bin": 5 * MiB, "c.txt": 1000}
    hashes = write_random_files(fs, files, seed=3)
    assert bs.json("tier", "optimize", "tank", "fast")["failed"] == 0
    env.umount_fs(fs)
    assert check_filesystem("ext4", loop).returncode == 0
    fs = env.mount_fs(loop, "fs", "ext4")
    assert hash_tree(fs) == hashes
    env.umount_fs(fs)
    env.detach_loop(loop)
    status = bs.json("tier", "status", "tank", "fast")[0]
    assert status["counters"]["write_allocations"] > 0
    bs.unmount(mountpoint, pid)
