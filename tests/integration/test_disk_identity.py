"""One identity per disk (issue 16 item 5).

A byte copy of a member beside the original (same disk UUID) is refused by `pool import`
and at open, both paths named in a one-line error: before, whichever path came last
silently spoke for the disk, and when it went away the other, stale one was served.

The CLI runs as a subprocess (`python -m blockspace --state-dir ...`); no mount is needed.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import trio

from blockspace.disks.devices import FileDevice
from blockspace.errors import BlockspaceError
from blockspace.pool.pool import Pool

from .helpers import BlockspaceEnv, MiB

DISK = 96 * MiB


def one_line_error(result: subprocess.CompletedProcess[str], *expected: str) -> str:
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode != 0, result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


def three_disk_pool(env: BlockspaceEnv, name: str = "ident") -> list[Path]:
    images = env.make_images([DISK] * 3)
    env.create_pool(name, images, slab_size="16M")
    return images


# ---- one identity per disk --------------------------------------------------------------


def test_pool_import_refuses_a_byte_copy_of_a_member(blockspace_env: BlockspaceEnv) -> None:
    env = blockspace_env
    images = three_disk_pool(env)
    env.create_volume("ident", "v", "32M", "parity")
    copy = env.images_dir / "copy-of-disk1.img"
    shutil.copyfile(images[1], copy)
    env.cli("pool", "export", "ident")

    result = env.cli("pool", "import", *map(str, images), str(copy), check=False)
    line = one_line_error(result, str(images[1]), str(copy), "copy")
    assert "disk 1" in line
    assert env.cli_json("pool", "list") == []  # nothing registered
    # Without the copy it imports as before.
    status = env.cli_json("pool", "import", *map(str, images))
    assert status["health"] == "online"


def test_a_registered_pool_with_a_duplicated_member_does_not_open(
    blockspace_env: BlockspaceEnv,
) -> None:
    """A member's image replaced by a copy of another member: the pool refuses to open
    (offline status, mount), naming both."""
    env = blockspace_env
    images = three_disk_pool(env)
    shutil.copyfile(images[0], images[2])
    result = env.cli("pool", "status", "ident", check=False)
    one_line_error(result, str(images[0]), str(images[2]))


def test_open_refuses_two_devices_with_one_disk_identity(tmp_path: Path) -> None:
    paths = []
    for i in range(2):
        path = tmp_path / f"d{i}.img"
        with open(path, "wb") as handle:
            handle.truncate(32 * MiB)
        paths.append(path)

    async def scenario() -> None:
        devices = [FileDevice(str(p)) for p in paths]
        pool = await Pool.create("dup", devices, media=["hdd"] * 2, slab_size=MiB,
                                 meta_slot_size=64 << 10)
        pool.close()
        for device in devices:
            device.close()
        copy = tmp_path / "d0-copy.img"
        shutil.copyfile(paths[0], copy)
        devices = [FileDevice(str(p)) for p in (*paths, copy)]
        try:
            with pytest.raises(BlockspaceError) as caught:
                await Pool.open(devices)
            message = str(caught.value)
            assert "\n" not in message
            assert f"{paths[0]} and {copy} both carry disk 0" in message
        finally:
            for device in devices:
                device.close()

    trio.run(scenario)
