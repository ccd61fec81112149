"""The daemon's FUSE loop on a real mount (blockspace/service/fuse_loop.py): under 16
concurrent requests it reads queued requests at once, the data written concurrently reads
back, and the daemon still unmounts cleanly; `BLOCKSPACE_FUSE_LOOP=stock` keeps pyfuse3's."""

from __future__ import annotations

import os
import random
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from .helpers import BlockspaceEnv, MiB, missing_prerequisites

MISSING = missing_prerequisites()
pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(MISSING is not None, reason=MISSING or ""),
]

BLOCK = 4096
THREADS = 16
SUMMARY = re.compile(r"FUSE loop: (\d+) requests read at once, (\d+) after a wait")


def hammer(volume: Path, blocks: int) -> None:
    """16 threads writing distinct blocks and reading them back, each 4 KiB a request
    (the file is served with direct_io), so requests queue up in /dev/fuse."""
    fd = os.open(volume, os.O_RDWR)
    try:
        def one(thread: int) -> None:
            rng = random.Random(thread)
            mine = [b for b in range(blocks) if b % THREADS == thread]
            for block in mine:
                os.pwrite(fd, bytes([thread + 1]) * 16 + block.to_bytes(8, "little") * 510,
                          block * BLOCK)
            for _ in range(4):
                rng.shuffle(mine)
                for block in mine:
                    data = os.pread(fd, BLOCK, block * BLOCK)
                    assert data == (bytes([thread + 1]) * 16
                                    + block.to_bytes(8, "little") * 510), block

        with ThreadPoolExecutor(THREADS) as pool:
            list(pool.map(one, range(THREADS)))  # re-raises a failed check
    finally:
        os.close(fd)


def mount_hammer_unmount(env: BlockspaceEnv) -> str:
    images = env.make_images([256 * MiB] * 2)
    env.create_pool("p", images, slab_size="32M")
    env.create_volume("p", "v", "64M", "mirror")
    mountpoint, pid = env.mount_pool("p")
    hammer(mountpoint / "v", 2048)
    env.unmount_pool(mountpoint, pid)
    return (env.state_dir / "log" / "p.log").read_text(errors="replace")


def test_queued_requests_are_read_at_once_and_the_data_is_right(
    blockspace_env: BlockspaceEnv,
) -> None:
    log_text = mount_hammer_unmount(blockspace_env)
    found = SUMMARY.search(log_text)
    assert found, "no FUSE loop summary in the daemon's log:\n" + log_text[-2000:]
    at_once, after_wait = map(int, found.groups())
    assert at_once > 0, found.group(0)  # pyfuse3's loop waits in trio for every request
    assert at_once + after_wait >= 2048 * 5  # every read and write went through it


def test_the_stock_loop_is_kept_when_asked(
    blockspace_env: BlockspaceEnv, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("BLOCKSPACE_FUSE_LOOP", "stock")  # the daemon inherits it
    log_text = mount_hammer_unmount(blockspace_env)
    assert "FUSE loop: pyfuse3's own" in log_text
    assert not SUMMARY.search(log_text)
