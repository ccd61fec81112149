"""`blockspace mount POOL DIR --nbd`: the daemon exports its volumes over NBD next to the FUSE
files. Real daemon, real qemu-img and qemu-io on the export, and the same volume read and
written through its FUSE file at the same time; a connected client keeps the volume from
being deleted and the pool from being unmounted without --force."""

import os
import socket
import stat
import struct
from pathlib import Path

import pytest

from blockspace.service import nbd_protocol as wire

from .helpers import (
    BlockspaceEnv,
    MiB,
    drop_caches,
    have_tool,
    missing_prerequisites,
    run,
    tool,
    wait_until,
)

MISSING = missing_prerequisites() or next(
    (f"{name} is not installed (apt-get install qemu-utils)"
     for name in ("qemu-img", "qemu-io") if not have_tool(name)), None)
pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(MISSING is not None, reason=MISSING or ""),
]

VOLUME = 64 * MiB


def nbd_uri(socket_path: str, name: str) -> str:
    return f"nbd+unix:///{name}?socket={socket_path}"


def connect_and_go(socket_path: str, name: str) -> socket.socket:
    """A client that has chosen `name` and then just stays connected."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(socket_path)
    assert sock.recv(18, socket.MSG_WAITALL) == wire.greeting()
    sock.sendall(struct.pack(">I", wire.FLAG_C_FIXED_NEWSTYLE | wire.FLAG_C_NO_ZEROES)
                 + wire.encode_option(wire.OPT_GO, wire.encode_info_request(name)))
    while True:
        _, reply, length = wire.decode_option_reply_header(sock.recv(20, socket.MSG_WAITALL))
        if length:
            sock.recv(length, socket.MSG_WAITALL)
        if reply == wire.REP_ACK:
            return sock
        assert not reply & wire.REP_ERROR_BIT, hex(reply)


def test_mount_with_nbd_serves_the_volumes_beside_their_files(
    blockspace_env: BlockspaceEnv,
) -> None:
    env = blockspace_env
    qemu_img, qemu_io = tool("qemu-img"), tool("qemu-io")
    env.create_pool("tank", env.make_images([256 * MiB] * 3), slab_size="8M")
    env.create_volume("tank", "vm", "64M", "parity", "--parity", "1")
    mountpoint, pid = env.mount_pool("tank", "--nbd")

    status = env.status("tank")
    socket_path = status["nbd"]["address"]
    assert socket_path == str(env.state_dir / "run" / "tank.nbd.sock")
    mode = os.stat(socket_path).st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o600
    uri = nbd_uri(socket_path, "vm")

    info = run([qemu_img, "info", "--output=json", uri]).stdout
    assert f'"virtual-size": {VOLUME}' in info

    # Written over NBD, read through the FUSE file; and the other way round.
    run([qemu_io, "-f", "raw", uri, "-c", "write -P 0x5c 1M 3M", "-c", "flush"])
    drop_caches()
    with open(mountpoint / "vm", "rb") as volume_file:
        volume_file.seek(1 * MiB)
        assert volume_file.read(3 * MiB) == b"\x5c" * (3 * MiB)
    with open(mountpoint / "vm", "r+b") as volume_file:
        volume_file.seek(10 * MiB)
        volume_file.write(b"\xa7" * MiB)
        volume_file.flush()
        os.fsync(volume_file.fileno())
    run([qemu_io, "-f", "raw", uri, "-c", "read -P 0xa7 10M 1M", "-c", "read -P 0x5c 1M 3M",
         "-c", "discard 2M 1M", "-c", "read -P 0 2M 1M"])

    # An image converted onto the export compares equal to the volume's FUSE file.
    image = env.root / "guest.raw"
    image.write_bytes(os.urandom(20 * MiB) + bytes(VOLUME - 20 * MiB))
    run([qemu_img, "convert", "-n", "-f", "raw", "-O", "raw", str(image), uri])
    drop_caches()
    run([qemu_img, "compare", "-f", "raw", "-F", "raw", str(image), str(mountpoint / "vm")])

    # A connected client holds the volume: no delete, no unmount without --force.
    client = connect_and_go(socket_path, "vm")
    try:
        assert env.status("tank")["nbd"]["exports"] == {"vm": 1}
        refused = env.cli("volume", "delete", "tank", "vm", check=False)
        assert refused.returncode == 1
        assert "exported over NBD" in refused.stderr
        busy = env.cli("unmount", str(mountpoint), check=False)
        assert busy.returncode != 0
        assert "in use" in busy.stderr
    finally:
        client.close()
    assert wait_until(lambda: not env.status("tank")["nbd"]["exports"], 10)
    env.unmount_pool(mountpoint, pid)
    assert not Path(socket_path).exists()


def test_mount_with_nbd_on_a_named_socket_and_bad_addresses(
    blockspace_env: BlockspaceEnv,
) -> None:
    env = blockspace_env
    qemu_io = tool("qemu-io")
    env.create_pool("tank", env.make_images([128 * MiB] * 2), slab_size="8M")
    env.create_volume("tank", "disk", "32M", "mirror", "--copies", "2")
    target = env.root / "pool-tank"
    target.mkdir()
    for bad in ("tcp:localhost", "tcp:localhost:99999"):
        refused = env.cli("mount", "tank", str(target), f"--nbd={bad}", check=False)
        assert refused.returncode == 2
        assert "bad NBD address" in refused.stderr
    assert [pool["mountpoint"] for pool in env.cli_json("pool", "list")] == [None]
    assert not os.path.ismount(target)

    socket_path = env.root / "exports.sock"
    mountpoint, pid = env.mount_pool("tank", f"--nbd={socket_path}")
    assert env.status("tank")["nbd"]["address"] == str(socket_path)
    run([qemu_io, "-f", "raw", nbd_uri(str(socket_path), "disk"),
         "-c", "write -P 0x3e 0 1M", "-c", "read -P 0x3e 0 1M"])
    env.unmount_pool(mountpoint, pid)
    assert not socket_path.exists()
