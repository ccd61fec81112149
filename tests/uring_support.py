"""What the io_uring tests share: whether this machine has a usable ring, and a small tmpfs
to fill up (writes past its size fail with ENOSPC)."""

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import trio

from blockspace.disks import uring


def _ring_available() -> bool:
    async def probe() -> bool:
        return uring.current() is not None

    return trio.run(probe)


needs_ring = pytest.mark.skipif(
    not _ring_available(), reason="io_uring is not available here (liburing missing, or the "
    "kernel or sandbox refuses io_uring_setup): devices use worker threads"
)


@contextmanager
def small_tmpfs(where: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` mounted at `where` (made here); always unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                   check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


