"""The NBD server (blockspace/service/nbd.py) on volumes on image files, in this test's own trio
run, with real clients as subprocesses (qemu-io and qemu-img from qemu-utils, nbdinfo and
nbdcopy from libnbd-bin) and a raw socket client for what no polite client sends: garbage,
oversized and out-of-range requests, disconnects in the middle, requests that overlap.

After each bad client the server must go on serving others, and the data must be intact."""

import contextlib
import errno
import json
import os
import shutil
import socket
import stat
import struct
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from blockspace.disks.devices import FileDevice
from blockspace.disks.faults import FaultSpec, FaultyDevice
from blockspace.errors import BlockspaceError, DeviceError, InvalidInput, NoSpace
from blockspace.geometry.layouts import LayoutSpec
from blockspace.pool.pool import Pool
from blockspace.service import nbd_protocol as wire
from blockspace.service.nbd import (
    NbdServer,
    TcpAddress,
    UnixAddress,
    default_socket_path,
    error_value,
    parse_address,
)
from blockspace.volume.discard import ZERO_CHUNK
from blockspace.volume.volume import Volume

MiB = 1 << 20
SLAB = MiB
PARITY = LayoutSpec("parity", 2, parity=1, interleave=64 << 10)
MIRROR = LayoutSpec("mirror", 1, copies=2, interleave=64 << 10)
SIMPLE = LayoutSpec("simple", 1, interleave=64 << 10)
VOLUME_SIZE = 16 * MiB
CLIENT_TIMEOUT = 60


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:  # tools/setup-env.sh installs them (qemu-utils, libnbd-bin)
        pytest.skip(f"{tool} is not installed (apt-get install qemu-utils libnbd-bin)")
    return path


def uri(socket_path: Path, name: str) -> str:
    return f"nbd+unix:///{name}?socket={socket_path}"


async def run(*command: str) -> str:
    """A client to its end; its output, or a failure with everything it said."""
    with trio.fail_after(CLIENT_TIMEOUT):
        result = await trio.run_process(list(command), capture_stdout=True,
                                        capture_stderr=True, check=False)
    output = result.stdout.decode() + result.stderr.decode()
    assert result.returncode == 0, f"{command} exited {result.returncode}:\n{output}"
    assert "failed" not in output.lower(), output
    return output


# ---- a pool on image files, its volumes exported -------------------------------------------

@dataclass
class Exported:
    pool: Pool
    server: NbdServer
    socket: Path
    served: dict[str, Any]  # what the server looks its exports up in (tests may change it)
    volumes: dict[str, Volume]
    devices: list[FaultyDevice]
    nursery: trio.Nursery

    def uri(self, name: str = "vol") -> str:
        return uri(self.socket, name)


def make_images(tmp_path: Path, disks: int, size: int) -> list[str]:
    paths = []
    for index in range(disks):
        path = tmp_path / f"disk{index}.img"
        with open(path, "wb") as image:
            image.truncate(size)
        paths.append(str(path))
    return paths


@asynccontextmanager
async def exported(
    tmp_path: Path, *, volumes: tuple[tuple[str, int, LayoutSpec], ...] = (
        ("vol", VOLUME_SIZE, PARITY),),
    disks: int = 3, disk_size: int = 40 * MiB,
    wrap: Callable[[Volume], Any] | None = None, **server_options: Any,
) -> AsyncIterator[Exported]:
    paths = make_images(tmp_path, disks, disk_size)
    devices = [FaultyDevice(FileDevice(path)) for path in paths]
    try:
        pool = await Pool.create("nbd", devices, media=["hdd"] * disks, slab_size=SLAB,
                                 meta_slot_size=64 << 10)
        await pool.enable_intent_log()
        plain: dict[str, Volume] = {}
        for name, size, spec in volumes:
            plain[name] = Volume(pool, await pool.create_volume(name, size, spec, "thin"))
        served: dict[str, Any] = {n: wrap(v) if wrap else v for n, v in plain.items()}
        server = NbdServer(lambda: served, **server_options)
        path = tmp_path / "nbd.sock"
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve, UnixAddress(path))
            yield Exported(pool, server, path, served, plain, devices, nursery)
            nursery.cancel_scope.cancel()
    finally:
        while OPEN_CLIENTS:
            OPEN_CLIENTS.pop().close()
        for device in devices:
            device.close()


async def settled(server: NbdServer) -> None:
    """Let the server notice clients that have gone (their tasks end at the next turn)."""
    with trio.fail_after(5):
        while server.statistics().connections:  # noqa: ASYNC110 - no event to wait on
            await trio.sleep(0.01)


class RawClient:
    """The client side of the protocol by hand, over a trio socket (closed at the end of
    `exported` at the latest)."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock
        self.buffer = bytearray()
        OPEN_CLIENTS.append(self)

    @classmethod
    async def connect(cls, path: Path) -> "RawClient":
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await sock.connect(str(path))
        return cls(sock)

    @classmethod
    async def go(cls, path: Path, name: str = "vol") -> "RawClient":
        client = await cls.connect(path)
        await client.negotiate()
        replies = await client.option(wire.OPT_GO, wire.encode_info_request(name))
        assert replies[-1][0] == wire.REP_ACK, replies
        return client

    def close(self) -> None:
        self.sock.close()

    async def send(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            sent = await self.sock.send(view)
            view = view[sent:]

    async def send_garbage(self, data: bytes) -> None:
        """Send what the server may close the connection on before it has all of it."""
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            await self.send(data)

    async def receive(self, size: int) -> bytes:
        with trio.fail_after(10):  # a reply that never comes fails the test, not hangs it
            while len(self.buffer) < size:
                chunk = await self.sock.recv(1 << 20)
                if not chunk:
                    raise EOFError(f"closed with {len(self.buffer)} of {size} bytes")
                self.buffer += chunk
        data = bytes(self.buffer[:size])
        del self.buffer[:size]
        return data

    async def negotiate(self, flags: int = wire.FLAG_C_FIXED_NEWSTYLE | wire.FLAG_C_NO_ZEROES
                        ) -> None:
        assert await self.receive(18) == wire.greeting()
        await self.send(struct.pack(">I", flags))

    async def option(self, option: int, data: bytes = b"") -> list[tuple[int, bytes]]:
        """Every reply to one option, up to its final one (ACK or an error)."""
        await self.send(wire.encode_option(option, data))
        replies = []
        while True:
            got, reply, length = wire.decode_option_reply_header(await self.receive(20))
            assert got == option
            replies.append((reply, await self.receive(length)))
            if reply == wire.REP_ACK or reply & wire.REP_ERROR_BIT:
                return replies

    async def request(self, command: int, offset: int = 0, length: int = 0, *,
                      handle: int = 1, flags: int = 0, payload: bytes = b"") -> None:
        await self.send(wire.encode_request(command, offset, length, handle=handle,
                                            flags=flags) + payload)

    async def reply(self, length: int = 0) -> tuple[int, int, bytes]:
        """(error, handle, data): a read's data follows only a success."""
        error, handle = wire.decode_simple_reply(await self.receive(16))
        return error, handle, await self.receive(length) if not error and length else b""

    async def reply_to(self, lengths: dict[int, int]) -> tuple[int, int, bytes]:
        """The next reply, whichever request it answers (`lengths`: handle -> read length)."""
        error, handle = wire.decode_simple_reply(await self.receive(16))
        length = lengths[handle]
        return error, handle, await self.receive(length) if not error and length else b""

    async def call(self, command: int, offset: int = 0, length: int = 0, *, flags: int = 0,
                   payload: bytes = b"") -> tuple[int, bytes]:
        await self.request(command, offset, length, handle=99, flags=flags, payload=payload)
        error, handle, data = await self.reply(length if command == wire.CMD_READ else 0)
        assert handle == 99
        return error, data

    async def closed_by_server(self) -> bool:
        """True once the server has closed the connection (an EOF or a reset)."""
        with trio.fail_after(10):
            try:
                while await self.sock.recv(65536):
                    pass
            except ConnectionResetError:
                pass
        self.close()
        return True


OPEN_CLIENTS: list[RawClient] = []


def pattern(seed: int, length: int) -> bytes:
    return (seed.to_bytes(4, "little") * (length // 4 + 1))[:length]


# ---- real clients ----------------------------------------------------------------------

def test_qemu_io_writes_reads_back_and_discards(tmp_path: Path) -> None:
    qemu_io = need("qemu-io")

    async def main() -> None:
        async with exported(tmp_path) as env:
            commands = [
                "write -P 0xab 0 2M", "write -f -P 0xcd 3M 64k",  # -f: FUA
                "read -P 0xab 0 2M", "read -P 0xcd 3M 64k",
                "discard 512k 1M", "read -P 0 512k 1M", "read -P 0xab 0 512k",
                "read -P 0xab 1536k 512k",
                "write -z 3M 4k", "read -P 0 3M 4k", "read -P 0xcd 3076k 60k",  # NO_HOLE
                "write -z -u 8M 2M",  # zeros into space never written
                "write -P 0x11 15M 1M", "read -P 0x11 15M 1M",  # the last MiB
                "flush",
            ]
            arguments = [a for c in commands for a in ("-c", c)]
            await run(qemu_io, "-f", "raw", env.uri(), *arguments)
            volume = env.volumes["vol"]
            expected = bytearray(VOLUME_SIZE)
            expected[0 : 2 * MiB] = b"\xab" * (2 * MiB)
            expected[3 * MiB : 3 * MiB + 65536] = b"\xcd" * 65536
            expected[512 << 10 : (512 << 10) + MiB] = bytes(MiB)
            expected[3 * MiB : 3 * MiB + 4096] = bytes(4096)
            expected[15 * MiB :] = b"\x11" * MiB
            assert await volume.read(0, VOLUME_SIZE) == expected
            # Zeros written where nothing was allocate nothing: only what the data touched.
            per_slab = volume.slab_data_size
            assert sorted(volume.record.slabs) == sorted(
                {0, (2 * MiB - 1) // per_slab, 3 * MiB // per_slab, 15 * MiB // per_slab})
            stats = env.server.statistics()
            assert stats.errors == 0
            assert stats.broken_clients == 0

    trio.run(main)


def test_nbdinfo_lists_exports_and_their_sizes(tmp_path: Path) -> None:
    nbdinfo = need("nbdinfo")
    volumes = (("vol", VOLUME_SIZE, PARITY), ("mirrored", 6 * MiB, MIRROR))

    async def main() -> None:
        async with exported(tmp_path, volumes=volumes) as env:
            listing = json.loads(await run(nbdinfo, "--list", "--json", env.uri("")))
            exports = {e["export-name"]: e for e in listing["exports"]}
            assert {n: e["export-size"] for n, e in exports.items()} == {
                "vol": VOLUME_SIZE, "mirrored": 6 * MiB}
            vol = exports["vol"]
            assert vol["is_read_only"] is False
            for feature in ("can_flush", "can_fua", "can_trim", "can_zero", "can_multi_conn"):
                assert vol[feature] is True, feature
            assert vol["can_df"] is False
            assert vol["can_fast_zero"] is False
            assert (vol["block_size_minimum"], vol["block_size_preferred"],
                    vol["block_size_maximum"]) == (1, 4096, 32 * MiB)
            assert (await run(nbdinfo, "--size", env.uri("mirrored"))).strip() == str(6 * MiB)

    trio.run(main)


def test_nbdcopy_copies_a_file_in_and_out(tmp_path: Path) -> None:
    nbdcopy = need("nbdcopy")
    source = tmp_path / "source.bin"
    data = os.urandom(11 * MiB + 12345)  # an unaligned tail: the minimum block is 1 byte
    source.write_bytes(data)
    copy = tmp_path / "copy.bin"

    async def main() -> None:
        async with exported(tmp_path) as env:
            # nbdcopy opens several connections when the export allows multi-conn.
            await run(nbdcopy, "--flush", str(source), env.uri())
            await run(nbdcopy, env.uri(), str(copy))
            assert await env.volumes["vol"].read(0, len(data)) == data
            stats = env.server.statistics()
            assert stats.errors == 0
            assert stats.bytes_written >= len(data)

    trio.run(main)
    copied = copy.read_bytes()
    assert len(copied) == VOLUME_SIZE
    assert copied[: len(data)] == data
    assert copied[len(data) :] == bytes(VOLUME_SIZE - len(data))


def test_qemu_img_converts_an_image_onto_the_export(tmp_path: Path) -> None:
    qemu_img = need("qemu-img")
    source = tmp_path / "source.raw"
    data = os.urandom(5 * MiB)
    source.write_bytes(data + bytes(VOLUME_SIZE - len(data)))

    async def main() -> None:
        async with exported(tmp_path) as env:
            info = json.loads(await run(qemu_img, "info", "--output=json", env.uri()))
            assert info["virtual-size"] == VOLUME_SIZE
            await run(qemu_img, "convert", "-n", "-f", "raw", "-O", "raw", str(source),
                      env.uri())
            await run(qemu_img, "compare", "-f", "raw", "-F", "raw", str(source), env.uri())
            assert await env.volumes["vol"].read(0, len(data)) == data

    trio.run(main)


def test_fio_verifies_random_writes_at_queue_depth_16(tmp_path: Path) -> None:
    """fio's nbd engine (libnbd) keeps 16 requests in flight and checks every block it wrote."""
    fio = need("fio")

    async def main() -> None:
        async with exported(tmp_path) as env:
            output = await run(
                fio, "--name=verify", "--ioengine=nbd", f"--uri={env.uri()}",
                "--rw=randwrite", "--bs=4k", "--size=8M", "--iodepth=16", "--verify=crc32c",
                "--do_verify=1", "--verify_fatal=1", "--verify_state_save=0",
                "--output-format=json")
            job = json.loads(output[output.index("{"):])["jobs"][0]
            assert job["error"] == 0
            assert job["write"]["io_bytes"] == 8 * MiB
            assert job["read"]["io_bytes"] == 8 * MiB  # the verify pass read it all back
            assert env.server.statistics().errors == 0

    trio.run(main)


def test_nbd_client_negotiates_and_lists(tmp_path: Path) -> None:
    """The kernel client's userspace half (nbd-client); attaching needs the nbd module, which
    the VM lab has and this machine's kernel does not."""
    nbd_client = need("nbd-client")

    async def main() -> None:
        async with exported(tmp_path, volumes=(("vol", VOLUME_SIZE, PARITY),
                                               ("second", 4 * MiB, MIRROR))) as env:
            output = await run(nbd_client, "-u", "-l", str(env.socket))
            assert output.split()[-2:] == ["second", "vol"]

    trio.run(main)


def test_a_read_only_export_refuses_writes_and_serves_reads(tmp_path: Path) -> None:
    qemu_io, nbdinfo = need("qemu-io"), need("nbdinfo")

    async def main() -> None:
        async with exported(tmp_path, read_only=True) as env:
            await env.volumes["vol"].write(0, b"\x5a" * MiB)
            info = json.loads(await run(nbdinfo, "--json", env.uri()))
            assert info["exports"][0]["is_read_only"] is True
            await run(qemu_io, "-r", "-f", "raw", env.uri(), "-c", "read -P 0x5a 0 1M")
            client = await RawClient.go(env.socket)
            for command in (wire.CMD_WRITE, wire.CMD_TRIM, wire.CMD_WRITE_ZEROES):
                payload = b"\xff" * 4096 if command == wire.CMD_WRITE else b""
                error, _ = await client.call(command, 0, 4096, payload=payload)
                assert error == wire.EPERM
            error, data = await client.call(wire.CMD_READ, 0, 4096)  # the stream kept framing
            assert (error, data) == (0, b"\x5a" * 4096)
            client.close()
            assert await env.volumes["vol"].read(0, MiB) == b"\x5a" * MiB

    trio.run(main)


def test_tcp_only_on_an_explicit_address(tmp_path: Path) -> None:
    qemu_io = need("qemu-io")

    async def main() -> None:
        async with exported(tmp_path) as env:
            server = NbdServer(lambda: env.served)
            await env.nursery.start(server.serve, TcpAddress("127.0.0.1", 0))
            host_port = server.address.removeprefix("tcp:")
            assert host_port.startswith("127.0.0.1:")
            await run(qemu_io, "-f", "raw", f"nbd://{host_port}/vol",
                      "-c", "write -P 0x77 0 64k", "-c", "read -P 0x77 0 64k")
            assert await env.volumes["vol"].read(0, 65536) == b"\x77" * 65536

    trio.run(main)


# ---- the server's own behaviour --------------------------------------------------------

def test_the_unix_socket_is_0600_and_goes_away_with_the_server(tmp_path: Path) -> None:
    async def main() -> None:
        async with exported(tmp_path) as env:
            mode = os.stat(env.socket).st_mode
            assert stat.S_ISSOCK(mode)
            assert stat.S_IMODE(mode) == 0o600
            assert env.server.address == str(env.socket)
            path = env.socket
        assert not path.exists()

    trio.run(main)


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a socket away needs root")
def test_the_socket_goes_to_the_owner_named(tmp_path: Path) -> None:
    async def main() -> None:
        async with exported(tmp_path) as env:
            path = tmp_path / "owned.sock"
            server = NbdServer(lambda: env.served)
            await env.nursery.start(server.serve, UnixAddress(path), (65534, 65533))
            info = os.stat(path)
            assert (info.st_uid, info.st_gid) == (65534, 65533)
            assert stat.S_IMODE(info.st_mode) == 0o600

    trio.run(main)


def test_a_stale_socket_is_replaced_and_anything_else_refused(tmp_path: Path) -> None:
    async def main() -> None:
        async with exported(tmp_path) as env:
            # A socket nobody listens on (a daemon that died): replaced.
            stale = tmp_path / "stale.sock"
            dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            dead.bind(str(stale))
            dead.close()
            second = NbdServer(lambda: env.served)
            await env.nursery.start(second.serve, UnixAddress(stale))
            client = await RawClient.go(stale)
            client.close()
            # A live socket: another server's, refused.
            with pytest.raises(InvalidInput, match="in use by another server"):
                await NbdServer(lambda: env.served).serve(UnixAddress(env.socket))
            # A file: refused, and left alone.
            precious = tmp_path / "precious.img"
            precious.write_bytes(b"data")
            with pytest.raises(InvalidInput, match="is not a socket"):
                await NbdServer(lambda: env.served).serve(UnixAddress(precious))
            assert precious.read_bytes() == b"data"
            with pytest.raises(BlockspaceError, match="cannot listen on"):
                await NbdServer(lambda: env.served).serve(
                    UnixAddress(tmp_path / "no" / "such" / "dir.sock"))
            with pytest.raises(BlockspaceError, match="cannot use .* for the NBD socket"):
                await NbdServer(lambda: env.served).serve(UnixAddress(precious / "x.sock"))
            # A TCP port already taken.
            first = NbdServer(lambda: env.served)
            await env.nursery.start(first.serve, TcpAddress("127.0.0.1", 0))
            taken = parse_address(first.address)
            assert isinstance(taken, TcpAddress)
            with pytest.raises(BlockspaceError, match="cannot listen on tcp:127.0.0.1"):
                await NbdServer(lambda: env.served).serve(taken)

    trio.run(main)


def test_replies_leave_in_the_order_requests_finish(tmp_path: Path) -> None:
    """Several requests in flight on one connection; a slow one does not hold up the rest."""
    gates: dict[int, trio.Event] = {}

    class Gated:
        def __init__(self, volume: Volume) -> None:
            self.inner = volume
            self.name, self.size = volume.name, volume.size

        async def read(self, offset: int, length: int) -> bytes | bytearray:
            if offset in gates:
                await gates[offset].wait()
            return await self.inner.read(offset, length)

        async def write(self, offset: int, data: Any) -> None:
            await self.inner.write(offset, data)

        async def flush(self) -> None:
            await self.inner.flush()

    async def main() -> None:
        async with exported(tmp_path, wrap=Gated) as env:
            await env.volumes["vol"].write(0, pattern(1, 8192))
            gates[0] = trio.Event()
            client = await RawClient.go(env.socket)
            await client.request(wire.CMD_READ, 0, 4096, handle=1)  # held at the gate
            await client.request(wire.CMD_READ, 4096, 4096, handle=2)
            await client.request(wire.CMD_WRITE, 8192, 4096, handle=3, payload=pattern(3, 4096))
            lengths = {1: 4096, 2: 4096, 3: 0}
            first_two = {await client.reply_to(lengths) for _ in range(2)}
            assert first_two == {(0, 2, pattern(1, 8192)[4096:]), (0, 3, b"")}
            gates[0].set()
            assert await client.reply_to(lengths) == (0, 1, pattern(1, 4096))
            client.close()

    trio.run(main)


def test_requests_in_flight_per_connection_are_bounded(tmp_path: Path) -> None:
    started: list[int] = []
    gate = trio.Event()

    class Slow:
        def __init__(self, volume: Volume) -> None:
            self.inner = volume
            self.name, self.size = volume.name, volume.size

        async def read(self, offset: int, length: int) -> bytes | bytearray:
            started.append(offset)
            await gate.wait()
            return await self.inner.read(offset, length)

        async def write(self, offset: int, data: Any) -> None:
            await self.inner.write(offset, data)

        async def flush(self) -> None:
            await self.inner.flush()

    async def main() -> None:
        async with exported(tmp_path, wrap=Slow, max_in_flight=2) as env:
            client = await RawClient.go(env.socket)
            for handle in range(4):
                await client.request(wire.CMD_READ, handle * 4096, 4096, handle=handle)
            # Every task of the server now waits (on the gate, or for a slot): had a third
            # request been taken, it would have started by now.
            await trio.testing.wait_all_tasks_blocked(cushion=0.05)
            assert sorted(started) == [0, 4096]  # the other two wait, unread, in the socket
            gate.set()
            handles = {(await client.reply(4096))[1] for _ in range(4)}
            assert handles == {0, 1, 2, 3}
            assert len(started) == 4
            client.close()

    trio.run(main)


def test_fua_and_flush_reply_only_after_the_volume_flushed(tmp_path: Path) -> None:
    flushes: list[str] = []
    release = trio.Event()

    class Counting:
        def __init__(self, volume: Volume) -> None:
            self.inner = volume
            self.name, self.size = volume.name, volume.size

        async def read(self, offset: int, length: int) -> bytes | bytearray:
            return await self.inner.read(offset, length)

        async def write(self, offset: int, data: Any) -> None:
            await self.inner.write(offset, data)

        async def flush(self) -> None:
            flushes.append("started")
            await release.wait()
            await self.inner.flush()
            flushes.append("done")

    async def main() -> None:
        async with exported(tmp_path, wrap=Counting) as env:
            client = await RawClient.go(env.socket)
            assert await client.call(wire.CMD_WRITE, 0, 4096, payload=b"a" * 4096) == (0, b"")
            assert flushes == []  # a plain write does not flush
            await client.request(wire.CMD_WRITE, 4096, 4096, handle=7, flags=wire.CMD_FLAG_FUA,
                                 payload=b"b" * 4096)
            with trio.move_on_after(0.3) as waited:
                await client.reply()
            assert waited.cancelled_caught
            assert flushes == ["started"]
            release.set()
            assert await client.reply() == (0, 7, b"")
            assert flushes == ["started", "done"]
            assert await client.call(wire.CMD_FLUSH) == (0, b"")
            assert flushes == ["started", "done"] * 2
            assert await client.call(wire.CMD_WRITE_ZEROES, 0, 4096,
                                     flags=wire.CMD_FLAG_FUA) == (0, b"")
            assert len(flushes) == 6
            client.close()

    trio.run(main)


def test_trim_and_write_zeroes_write_bounded_chunks(tmp_path: Path) -> None:
    writes: list[tuple[int, int]] = []

    class Recording:
        def __init__(self, volume: Volume) -> None:
            self.inner = volume
            self.name, self.size = volume.name, volume.size

        async def read(self, offset: int, length: int) -> bytes | bytearray:
            return await self.inner.read(offset, length)

        async def write(self, offset: int, data: Any) -> None:
            writes.append((offset, len(data)))
            await self.inner.write(offset, data)

        async def flush(self) -> None:
            await self.inner.flush()

    async def main() -> None:
        async with exported(tmp_path, wrap=Recording) as env:
            volume = env.volumes["vol"]
            await volume.write(0, b"\xee" * VOLUME_SIZE)
            client = await RawClient.go(env.socket)
            start, length = 300_000, 3 * MiB + 5
            assert await client.call(wire.CMD_TRIM, start, length) == (0, b"")
            assert writes[0] == (start, ZERO_CHUNK - start)  # then aligned to the chunk
            assert all(n <= ZERO_CHUNK for _, n in writes)
            assert sum(n for _, n in writes) == length
            assert [o for o, _ in writes[1:]] == [MiB, 2 * MiB, 3 * MiB]
            writes.clear()
            zeroes = (9 * MiB, VOLUME_SIZE - 9 * MiB)
            assert await client.call(wire.CMD_WRITE_ZEROES, *zeroes,
                                     flags=wire.CMD_FLAG_NO_HOLE) == (0, b"")
            assert writes == [(9 * MiB + i * MiB, MiB) for i in range(7)]
            client.close()
            data = await volume.read(0, VOLUME_SIZE)
            expected = bytearray(b"\xee" * VOLUME_SIZE)
            expected[start : start + length] = bytes(length)
            expected[9 * MiB :] = bytes(VOLUME_SIZE - 9 * MiB)
            assert data == expected

    trio.run(main)


def test_options_the_server_does_not_know_are_answered_unsupported(tmp_path: Path) -> None:
    async def main() -> None:
        async with exported(tmp_path) as env:
            client = await RawClient.connect(env.socket)
            await client.negotiate()
            for option in (wire.OPT_STARTTLS, wire.OPT_EXTENDED_HEADERS, 4, 12345):
                [(reply, _)] = await client.option(option)
                assert reply == wire.REP_ERR_UNSUP
            [(reply, message)] = await client.option(wire.OPT_GO,
                                                     wire.encode_info_request("nosuch"))
            assert reply == wire.REP_ERR_UNKNOWN
            assert b"volumes: vol" in message
            [(reply, _)] = await client.option(wire.OPT_INFO, b"\x00\x00\x00\x09vol")
            assert reply == wire.REP_ERR_INVALID
            [(reply, _)] = await client.option(wire.OPT_LIST, b"junk")
            assert reply == wire.REP_ERR_INVALID
            replies = await client.option(wire.OPT_LIST)
            assert replies == [(wire.REP_SERVER, wire.encode_server_entry("vol")),
                               (wire.REP_ACK, b"")]
            replies = await client.option(
                wire.OPT_INFO, wire.encode_info_request("vol", (wire.INFO_NAME,)))
            infos = {payload[:2]: payload for reply, payload in replies if reply == wire.REP_INFO}
            assert infos[b"\x00\x00"][2:10] == struct.pack(">Q", VOLUME_SIZE)
            assert infos[b"\x00\x01"] == b"\x00\x01vol"
            assert struct.unpack(">HIII", infos[b"\x00\x03"]) == (3, 1, 4096, 32 * MiB)
            # After all that, GO still works, then a read.
            replies = await client.option(wire.OPT_GO, wire.encode_info_request("vol"))
            assert replies[-1][0] == wire.REP_ACK
            assert await client.call(wire.CMD_READ, 0, 512) == (0, bytes(512))
            client.close()

    trio.run(main)


def test_export_name_and_abort(tmp_path: Path) -> None:
    async def main() -> None:
        async with exported(tmp_path) as env:
            # The old way in: NBD_OPT_EXPORT_NAME, with and without the 124 zeros.
            for flags, tail in ((wire.FLAG_C_FIXED_NEWSTYLE, 124), (wire.FLAG_C_NO_ZEROES, 0)):
                client = await RawClient.connect(env.socket)
                await client.negotiate(flags)
                await client.send(wire.encode_option(wire.OPT_EXPORT_NAME, b"vol"))
                size, transmission = struct.unpack(">QH", await client.receive(10))
                assert size == VOLUME_SIZE
                assert transmission & wire.FLAG_SEND_FLUSH
                assert await client.receive(tail) == bytes(tail)
                assert await client.call(wire.CMD_READ, 0, 512) == (0, bytes(512))
                await client.request(wire.CMD_DISC)
                assert await client.closed_by_server()
            # An export that does not exist: this option cannot answer an error, only close.
            client = await RawClient.connect(env.socket)
            await client.negotiate()
            await client.send(wire.encode_option(wire.OPT_EXPORT_NAME, b"nosuch"))
            assert await client.closed_by_server()
            client = await RawClient.connect(env.socket)
            await client.negotiate()
            assert await client.option(wire.OPT_ABORT) == [(wire.REP_ACK, b"")]
            assert await client.closed_by_server()
            await settled(env.server)
            assert env.server.statistics().broken_clients == 0

    trio.run(main)


# ---- bad clients -----------------------------------------------------------------------

def test_bad_clients_then_a_good_one_and_the_data_is_intact(tmp_path: Path) -> None:
    qemu_io = need("qemu-io")
    old = pattern(0xC0FFEE, 2 * MiB)

    async def main() -> None:
        async with exported(tmp_path) as env:
            volume = env.volumes["vol"]
            await volume.write(0, old)
            await volume.write(VOLUME_SIZE - MiB, old[:MiB])

            # Garbage instead of the client flags.
            client = await RawClient.connect(env.socket)
            assert await client.receive(18) == wire.greeting()
            await client.send_garbage(os.urandom(4096) + b"\xff\xff\xff\xff")
            assert await client.closed_by_server()

            # Garbage instead of an option, and half an option then a disconnect.
            client = await RawClient.connect(env.socket)
            await client.negotiate()
            await client.send_garbage(b"this is not IHAVEOPT at all")
            assert await client.closed_by_server()
            client = await RawClient.connect(env.socket)
            await client.negotiate()
            await client.send(wire.encode_option(wire.OPT_GO, wire.encode_info_request("vol"))[:9])
            client.close()
            # An option claiming a gigabyte of data.
            client = await RawClient.connect(env.socket)
            await client.negotiate()
            await client.send(struct.pack(">QII", wire.IHAVEOPT, wire.OPT_GO, 1 << 30))
            assert await client.closed_by_server()

            # Garbage instead of a request header.
            client = await RawClient.go(env.socket)
            await client.send_garbage(os.urandom(28 * 50))
            assert await client.closed_by_server()

            # Oversized: a 64 MiB write cannot be skipped (closed); a 64 MiB read is refused.
            client = await RawClient.go(env.socket)
            assert await client.call(wire.CMD_READ, 0, 64 * MiB) == (wire.EINVAL, b"")
            await client.request(wire.CMD_WRITE, 0, 64 * MiB)
            await client.send_garbage(b"\x01" * MiB)
            assert await client.closed_by_server()

            # Past the end: answered, and the connection goes on.
            client = await RawClient.go(env.socket)
            past = (VOLUME_SIZE - 4096, 8192)
            assert await client.call(wire.CMD_WRITE, *past, payload=b"\x02" * 8192) == (
                wire.ENOSPC, b"")
            assert await client.call(wire.CMD_READ, *past) == (wire.EINVAL, b"")
            assert await client.call(wire.CMD_TRIM, *past) == (wire.EINVAL, b"")
            assert await client.call(wire.CMD_WRITE_ZEROES, *past) == (wire.ENOSPC, b"")
            assert await client.call(wire.CMD_READ, 2**64 - 4096, 4096) == (wire.EINVAL, b"")
            # Unknown commands and flags, and a flush with a range.
            assert await client.call(9, 0, 0) == (wire.EINVAL, b"")
            assert await client.call(wire.CMD_READ, 0, 4096, flags=1 << 9) == (wire.EINVAL, b"")
            assert await client.call(wire.CMD_BLOCK_STATUS, 0, 4096) == (wire.EINVAL, b"")
            assert await client.call(wire.CMD_FLUSH, 0, 4096) == (wire.EINVAL, b"")
            assert await client.call(wire.CMD_READ, 0, 4096) == (0, old[:4096])
            client.close()

            # A disconnect in the middle of a write's payload: nothing of it is written.
            client = await RawClient.go(env.socket)
            await client.request(wire.CMD_WRITE, 0, MiB)
            await client.send(b"\x03" * (MiB // 2))
            client.close()
            # And in the middle of a request header.
            client = await RawClient.go(env.socket)
            await client.send(wire.encode_request(wire.CMD_READ, 0, 4096)[:10])
            client.close()
            # A client that sends requests and never reads the replies, then goes.
            client = await RawClient.go(env.socket)
            for handle in range(200):
                await client.request(wire.CMD_READ, 0, MiB, handle=handle)
            client.close()

            await settled(env.server)
            stats = env.server.statistics()
            assert stats.broken_clients == 5  # flags, option, 1 GiB option, header, write
            assert stats.connections == 0
            assert stats.buffered_bytes == 0
            assert not stats.exports

            # A good client afterwards: everything is as it was, and it can write.
            await run(qemu_io, "-f", "raw", env.uri(),
                      "-c", "read -P 0 2M 1M",
                      "-c", "write -P 0x44 4M 1M", "-c", "read -P 0x44 4M 1M")
            assert await volume.read(0, 2 * MiB) == old
            assert await volume.read(VOLUME_SIZE - MiB, MiB) == old[:MiB]

    trio.run(main)


def test_connections_over_the_limit_are_refused_and_handshakes_time_out(tmp_path: Path) -> None:
    async def main() -> None:
        async with exported(tmp_path, max_connections=2, handshake_timeout=0.5) as env:
            first = await RawClient.go(env.socket)
            second = await RawClient.connect(env.socket)  # never says a word
            assert await second.receive(18) == wire.greeting()
            third = await RawClient.connect(env.socket)
            assert await third.closed_by_server()
            assert env.server.statistics().refused == 1
            with trio.fail_after(5):
                assert await second.closed_by_server()  # its handshake took too long
            # The transmitting client is not timed out, however idle.
            await trio.sleep(0.6)
            assert await first.call(wire.CMD_READ, 0, 4096) == (0, bytes(4096))
            fourth = await RawClient.go(env.socket)  # a slot is free again
            assert await fourth.call(wire.CMD_READ, 0, 4096) == (0, bytes(4096))
            for client in (first, second, third, fourth):
                client.close()

    trio.run(main)


def test_a_client_that_reads_no_replies_holds_little_and_is_let_go(tmp_path: Path) -> None:
    """It fills its own share of buffers, not everyone's, and is disconnected once its
    replies have waited `send_timeout`; another client is served all along."""
    sizes = wire.BlockSizes(maximum=MiB)

    async def main() -> None:
        async with exported(tmp_path, block_sizes=sizes, connection_budget=4 * MiB,
                            buffer_budget=6 * MiB, send_timeout=3.0) as env:
            await env.volumes["vol"].write(0, pattern(5, MiB))
            stuck = await RawClient.go(env.socket)
            for handle in range(64):
                await stuck.request(wire.CMD_READ, 0, MiB, handle=handle)
            await trio.sleep(0.3)
            held = env.server.statistics().buffered_bytes
            assert 0 < held <= 4 * MiB
            polite = await RawClient.go(env.socket)
            for _ in range(8):
                assert await polite.call(wire.CMD_READ, 0, MiB) == (0, pattern(5, MiB))
            assert env.server.statistics().exports == {"vol": 2}  # served while it is stuck
            with trio.fail_after(10):
                while env.server.statistics().exports.get("vol") != 1:  # noqa: ASYNC110
                    await trio.sleep(0.05)
            assert await polite.call(wire.CMD_READ, 0, 4096) == (0, pattern(5, 4096))
            assert await stuck.closed_by_server()
            polite.close()
            await settled(env.server)
            assert env.server.statistics().buffered_bytes == 0

    trio.run(main)


def test_an_unexpected_error_closes_that_connection_only(tmp_path: Path) -> None:
    class Buggy:
        def __init__(self, volume: Volume) -> None:
            self.inner = volume
            self.name, self.size = volume.name, volume.size

        async def read(self, offset: int, length: int) -> bytes | bytearray:
            if offset == 4096:
                raise RuntimeError("a bug")
            return await self.inner.read(offset, length)

        async def write(self, offset: int, data: Any) -> None:
            await self.inner.write(offset, data)

        async def flush(self) -> None:
            await self.inner.flush()

    async def main() -> None:
        async with exported(tmp_path, wrap=Buggy) as env:
            bystander = await RawClient.go(env.socket)
            client = await RawClient.go(env.socket)
            await client.request(wire.CMD_READ, 4096, 4096)
            assert await client.closed_by_server()
            assert await bystander.call(wire.CMD_READ, 0, 4096) == (0, bytes(4096))
            bystander.close()

    trio.run(main)


# ---- volume errors as NBD errors -------------------------------------------------------

def test_a_failed_disk_answers_eio_and_the_connection_goes_on(tmp_path: Path) -> None:
    async def main() -> None:
        volumes = (("vol", 8 * MiB, SIMPLE),)  # no redundancy: a dead disk is an I/O error
        async with exported(tmp_path, volumes=volumes, disks=1) as env:
            await env.volumes["vol"].write(0, b"\x42" * MiB)
            client = await RawClient.go(env.socket)
            env.devices[0].set_spec(FaultSpec(dead=True))
            assert await client.call(wire.CMD_READ, 0, 4096) == (wire.EIO, b"")
            assert await client.call(wire.CMD_FLUSH) == (wire.EIO, b"")
            assert await client.call(wire.CMD_WRITE, 4096, 4096,  # into the allocated slab
                                     payload=b"x" * 4096) == (wire.EIO, b"")
            assert env.server.statistics().errors == 3
            client.close()

    trio.run(main)


def test_a_full_pool_answers_enospc(tmp_path: Path) -> None:
    async def main() -> None:
        # A thin volume far larger than its pool: writes allocate until nothing is left.
        volumes = (("vol", 256 * MiB, SIMPLE),)
        async with exported(tmp_path, volumes=volumes, disks=1, disk_size=12 * MiB) as env:
            client = await RawClient.go(env.socket)
            results = []
            for slab in range(16):
                error, _ = await client.call(wire.CMD_WRITE, slab * MiB, 4096,
                                             payload=b"\x07" * 4096)
                results.append(error)
            assert results[0] == 0
            assert wire.ENOSPC in results
            assert set(results) == {0, wire.ENOSPC}
            written = results.index(wire.ENOSPC)
            assert await client.call(wire.CMD_READ, 0, 4096) == (0, b"\x07" * 4096)
            assert await client.call(wire.CMD_READ, (written - 1) * MiB, 4096) == (
                0, b"\x07" * 4096)
            client.close()

    trio.run(main)


def test_volume_errors_map_to_nbd_errors() -> None:
    assert error_value(NoSpace("full")) == wire.ENOSPC
    assert error_value(InvalidInput("bad")) == wire.EINVAL
    assert error_value(DeviceError("gone")) == wire.EIO
    assert error_value(BlockspaceError("other")) == wire.EIO
    read_only = BlockspaceError("read-only")
    read_only.errno = errno.EROFS  # type: ignore[attr-defined]
    assert error_value(read_only) == wire.EPERM


def test_a_volume_no_longer_served_fails_its_requests(tmp_path: Path) -> None:
    volumes = (("vol", VOLUME_SIZE, PARITY), ("other", 4 * MiB, MIRROR))

    async def main() -> None:
        async with exported(tmp_path, volumes=volumes) as env:
            client = await RawClient.go(env.socket)
            assert await client.call(wire.CMD_READ, 0, 4096) == (0, bytes(4096))
            assert env.server.is_open("vol")
            assert not env.server.is_open("other")
            assert env.server.statistics().exports == {"vol": 1}
            gone = env.served.pop("vol")
            assert await client.call(wire.CMD_READ, 0, 4096) == (wire.EIO, b"")
            env.served["vol"] = env.volumes["other"]  # another volume under the same name
            assert await client.call(wire.CMD_WRITE, 0, 4096,
                                     payload=b"z" * 4096) == (wire.EIO, b"")
            assert await env.volumes["other"].read(0, 4096) == bytes(4096)
            env.served["vol"] = gone
            assert await client.call(wire.CMD_READ, 0, 4096) == (0, bytes(4096))
            await client.request(wire.CMD_DISC)
            assert await client.closed_by_server()
            await settled(env.server)
            assert not env.server.is_open("vol")

    trio.run(main)


# ---- addresses -------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "expected"), [
    ("/run/blockspace/p.nbd.sock", UnixAddress(Path("/run/blockspace/p.nbd.sock"))),
    ("tcp:127.0.0.1:10809", TcpAddress("127.0.0.1", 10809)),
    ("tcp:[::1]:10809", TcpAddress("::1", 10809)),
    ("tcp:localhost:0", TcpAddress("localhost", 0)),
])
def test_parse_address(text: str, expected: object) -> None:
    assert parse_address(text) == expected


def test_a_relative_socket_path_is_made_absolute() -> None:
    assert parse_address("x.sock") == UnixAddress(Path(os.getcwd()) / "x.sock")


@pytest.mark.parametrize("text", ["", "tcp:", "tcp:host", "tcp::10809", "tcp:h:port",
                                  "tcp:h:65536", "tcp:h:-1", "a\0b"])
def test_bad_addresses_are_refused(text: str) -> None:
    with pytest.raises(InvalidInput, match="bad NBD"):
        parse_address(text)


def test_address_text_round_trips() -> None:
    for address in (TcpAddress("127.0.0.1", 1), TcpAddress("::1", 2),
                    UnixAddress(Path("/tmp/x.sock"))):
        assert parse_address(str(address)) == address
    assert default_socket_path(Path("/var/lib/blockspace/run"), "tank") == Path(
        "/var/lib/blockspace/run/tank.nbd.sock")
