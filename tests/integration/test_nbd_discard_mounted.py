"""Discard over NBD on a mounted daemon gives space back (issue 20 item 3): qemu-io writes a
thin volume through `mount --nbd`, discards most of it, and `pool status --json` shows the
volume's allocation drop, live and after an unmount (the unmap was committed)."""

from typing import Any

import pytest

from .helpers import BlockspaceEnv, MiB, have_tool, missing_prerequisites, run, tool

MISSING = missing_prerequisites() or (
    None if have_tool("qemu-io") else "qemu-io is not installed (apt-get install qemu-utils)")
pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(MISSING is not None, reason=MISSING or ""),
]


def allocated(status: dict[str, Any], name: str) -> int:
    return next(v["allocated"] for v in status["volumes"] if v["name"] == name)


def test_trim_over_nbd_shows_in_pool_status(blockspace_env: BlockspaceEnv) -> None:
    env = blockspace_env
    qemu_io = tool("qemu-io")
    env.create_pool("tank", env.make_images([128 * MiB] * 3), slab_size="4M")
    env.create_volume("tank", "thin", "64M", "parity", "--parity", "1")  # 8 MiB a slab
    mountpoint, pid = env.mount_pool("tank", "--nbd")
    status = env.status("tank")
    uri = f"nbd+unix:///thin?socket={status['nbd']['address']}"
    assert allocated(status, "thin") == 0

    run([qemu_io, "-f", "raw", uri, "-c", "write -P 0x42 0 64M", "-c", "flush"])
    full = env.status("tank")
    assert allocated(full, "thin") == 64 * MiB
    used = sum(d["used_bytes"] for d in full["disks"])

    # 40 MiB from 4 MiB on: slabs 1..4 whole (8-40 MiB), half of slab 0 and of slab 5 zeroed.
    run([qemu_io, "-f", "raw", uri, "-c", "discard 4M 40M", "-c", "read -P 0 4M 40M",
         "-c", "read -P 0x42 0 4M", "-c", "read -P 0x42 44M 20M"])
    trimmed = env.status("tank")
    assert allocated(trimmed, "thin") == 32 * MiB
    assert sum(d["used_bytes"] for d in trimmed["disks"]) == used - 4 * 3 * 4 * MiB

    env.unmount_pool(mountpoint, pid)
    offline = env.cli_json("pool", "status", "tank")
    assert allocated(offline, "thin") == 32 * MiB
