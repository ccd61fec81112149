"""One identity per disk, and images only root can reach (issue 16 item 5, issue 17 item 4).

* A byte copy of a member beside the original (same disk UUID) is refused by `pool import`
  and at open, both paths named in a one-line error: before, whichever path came last
  silently spoke for the disk, and when it went away the other, stale one was served.
* Image files get mode 0600 at `pool create` and `disk add`, so no other user reads a
  volume through them or blocks the pool with a lock of their own.
* A lock another process holds on an image is reported with that process's pid.

The CLI runs as a subprocess (`python -m blockspace --state-dir ...`); no mount is needed.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from blockspace.disks.devices import FileDevice
from blockspace.disks.locks import describe_holders, lock_holders
from blockspace.errors import BlockspaceError
from blockspace.pool.pool import Pool

from .helpers import BlockspaceEnv, MiB, system_python

DISK = 96 * MiB
NOBODY = 65534


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


# ---- images only root can reach -----------------------------------------------------------


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_images_become_0600_at_pool_create_and_disk_add(blockspace_env: BlockspaceEnv) -> None:
    env = blockspace_env
    images = env.make_images([DISK] * 4)
    for image in images:
        image.chmod(0o666)
    env.create_pool("private", images[:3], slab_size="16M")
    assert [mode(image) for image in images[:3]] == [0o600] * 3
    assert mode(images[3]) == 0o666
    env.cli("disk", "add", "private", str(images[3]))
    assert mode(images[3]) == 0o600


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
def test_another_user_can_neither_read_nor_lock_a_member(blockspace_env: BlockspaceEnv) -> None:
    env = blockspace_env
    images = env.make_images([DISK] * 3)
    for image in images:
        image.chmod(0o644)  # what `truncate` leaves under the usual umask
    env.create_pool("private", images, slab_size="16M")
    probe = ("import fcntl, sys\n"
             "try:\n"
             "    fcntl.flock(open(sys.argv[1], 'rb'), fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
             "except PermissionError:\n"
             "    sys.exit(13)\n")
    result = subprocess.run([system_python(), "-c", probe, str(images[0])], user=NOBODY,
                            group=NOBODY, capture_output=True, text=True, check=False)
    assert result.returncode == 13, result.stderr


# ---- a lock held by another process ---------------------------------------------------------


class LockHolder:
    """Another process holding an exclusive flock on `path` until stopped."""

    def __init__(self, path: Path) -> None:
        code = ("import fcntl, sys\n"
                "f = open(sys.argv[1], 'rb')\n"
                "fcntl.flock(f, fcntl.LOCK_EX)\n"
                "print('locked', flush=True)\n"
                "sys.stdin.read()\n")
        self.process = subprocess.Popen([sys.executable, "-c", code, str(path)],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        text=True)
        assert self.process.stdout is not None
        assert self.process.stdout.readline().strip() == "locked"

    def stop(self) -> None:
        assert self.process.stdin is not None
        assert self.process.stdout is not None
        self.process.stdin.close()
        self.process.wait(timeout=30)
        self.process.stdout.close()


def test_a_lock_held_by_another_process_is_reported_with_its_pid(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    with open(image, "wb") as handle:
        handle.truncate(8 * MiB)
    holder = LockHolder(image)
    try:
        with pytest.raises(BlockspaceError) as caught:
            FileDevice(str(image))
        message = str(caught.value)
        assert message.startswith(f"{image} is in use by another process (a mounted pool?): "
                                  f"pid {holder.process.pid} (")
        assert message.endswith(") holds its lock")
    finally:
        holder.stop()
    FileDevice(str(image)).close()  # free again once it let go


def test_the_cli_names_the_process_that_blocks_a_pool(blockspace_env: BlockspaceEnv) -> None:
    env = blockspace_env
    images = three_disk_pool(env)
    holder = LockHolder(images[1])
    try:
        result = env.cli("pool", "status", "ident", check=False)
        one_line_error(result, str(images[1]), f"pid {holder.process.pid}")
    finally:
        holder.stop()
    assert env.status("ident")["health"] == "online"


def test_lock_holders_reads_proc_locks(tmp_path: Path) -> None:
    """The parser on the kernel's format: holders of this file only, never waiters, and no
    pid 0 (a holder outside our pid namespace)."""
    target = tmp_path / "f"
    target.write_bytes(b"x")
    fd = os.open(target, os.O_RDONLY)
    try:
        st = os.fstat(fd)
        dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}"
        other = f"{dev}:{st.st_ino + 1}"
        table = tmp_path / "locks"
        table.write_text(
            f"1: FLOCK  ADVISORY  WRITE 4321 {dev}:{st.st_ino} 0 EOF\n"
            f"1: -> FLOCK  ADVISORY  WRITE 999 {dev}:{st.st_ino} 0 EOF\n"
            f"2: POSIX  ADVISORY  READ 77 {other} 0 EOF\n"
            f"3: OFDLCK ADVISORY  WRITE 0 {dev}:{st.st_ino} 0 EOF\n"
            "garbage\n"
        )
        assert lock_holders(fd, proc_locks=str(table)) == [4321]
        assert lock_holders(fd, proc_locks=str(tmp_path / "absent")) == []
    finally:
        os.close(fd)
    assert describe_holders([os.getpid()]).startswith(f"pid {os.getpid()} (")
    assert describe_holders([]) == ""
