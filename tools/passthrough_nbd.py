#!/usr/bin/env python3
"""A minimal trio NBD pass-through server: the Python NBD ceiling for `tools/bench`, as
tools/passthrough_fuse.py is the FUSE one.

It serves one image file over a Unix socket (any export name), the fixed newstyle handshake
with NBD_OPT_GO/EXPORT_NAME only, and READ, WRITE, FLUSH, TRIM (ignored), WRITE_ZEROES and
DISC with simple replies. Each request is carried out inline with a blocking `os.pread` /
`os.pwrite` on the trio thread (nothing is faster in Python, and a real server must not do
it), and the replies to all the requests one receive brought in go out in one send. The
image is opened buffered, like Blockspace's disks. No checks a real server needs: a
benchmark reference, not a server.

    python3 tools/passthrough_nbd.py IMAGE SOCKET
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import struct
import sys

import trio

NBDMAGIC, IHAVEOPT, REPLY_MAGIC = 0x4E42444D41474943, 0x49484156454F5054, 0x3E889045565A9
REQUEST_MAGIC, SIMPLE_REPLY_MAGIC = 0x25609513, 0x67446698
OPT_EXPORT_NAME, OPT_ABORT, OPT_GO, REP_ACK, REP_INFO, REP_ERR_UNSUP = 1, 2, 7, 1, 3, 2**31 + 1
FLAGS = 1 | 4 | 8 | 32 | 64  # HAS_FLAGS, SEND_FLUSH, SEND_FUA, SEND_TRIM, SEND_WRITE_ZEROES
CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_TRIM, CMD_WRITE_ZEROES = 0, 1, 2, 3, 4, 6
HEADER = struct.Struct(">IHHQQI")
REPLY = struct.Struct(">IIQ")
EIO = 5


class Stream:
    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream, self.buffer = stream, bytearray()

    async def fill(self, size: int) -> bool:
        while len(self.buffer) < size:
            chunk = await self.stream.receive_some(1 << 20)
            if not chunk:
                return False
            self.buffer += chunk
        return True

    async def take(self, size: int) -> bytes:
        if not await self.fill(size):
            raise EOFError
        data = bytes(self.buffer[:size])
        del self.buffer[:size]
        return data


async def handshake(s: Stream, size: int) -> bool:
    await s.stream.send_all(struct.pack(">QQH", NBDMAGIC, IHAVEOPT, 1 | 2))
    (client_flags,) = struct.unpack(">I", await s.take(4))
    while True:
        _, option, length = struct.unpack(">QII", await s.take(16))
        await s.take(length)
        if option == OPT_EXPORT_NAME:
            zeros = b"" if client_flags & 2 else bytes(124)
            await s.stream.send_all(struct.pack(">QH", size, FLAGS) + zeros)
            return True
        if option == OPT_ABORT:
            return False
        if option == OPT_GO:
            info = struct.pack(">HQH", 0, size, FLAGS)  # NBD_INFO_EXPORT
            await s.stream.send_all(
                struct.pack(">QIII", REPLY_MAGIC, option, REP_INFO, len(info)) + info
                + struct.pack(">QIII", REPLY_MAGIC, option, REP_ACK, 0))
            return True
        await s.stream.send_all(struct.pack(">QIII", REPLY_MAGIC, option, REP_ERR_UNSUP, 0))


async def serve(stream: trio.SocketStream, fd: int, size: int) -> None:
    s = Stream(stream)
    try:
        if not await handshake(s, size):
            return
        while await s.fill(HEADER.size):
            out: list[bytes] = []
            # Every request already received, inline; then their replies in one send.
            while len(s.buffer) >= HEADER.size:
                magic, _, command, handle, offset, length = HEADER.unpack_from(s.buffer)
                if magic != REQUEST_MAGIC:
                    return
                need = HEADER.size + (length if command == CMD_WRITE else 0)
                if len(s.buffer) < need and out:
                    break  # send what is done before waiting for a payload
                if not await s.fill(need):
                    return
                payload = memoryview(s.buffer)[HEADER.size:need]
                error, data = 0, b""
                try:
                    if command == CMD_READ:
                        data = os.pread(fd, length, offset)
                    elif command == CMD_WRITE:
                        os.pwrite(fd, payload, offset)
                    elif command == CMD_FLUSH:
                        os.fdatasync(fd)
                    elif command == CMD_WRITE_ZEROES:
                        os.pwrite(fd, bytes(length), offset)
                    elif command == CMD_DISC:
                        return
                except OSError:
                    error, data = EIO, b""
                payload.release()
                del s.buffer[:need]
                out.append(REPLY.pack(SIMPLE_REPLY_MAGIC, error, handle) + data)
            if out:
                await stream.send_all(b"".join(out))
    except (EOFError, trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        await stream.aclose()


async def main(image: str, path: str) -> None:
    fd = os.open(image, os.O_RDWR)
    size = os.fstat(fd).st_size
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)  # a socket left by an earlier run
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.bind(path)
    sock.listen(16)
    listener = trio.SocketListener(sock)
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.serve_listeners, lambda st: serve(st, fd, size),
                               [listener])
            async for _ in signals:
                nursery.cancel_scope.cancel()
    os.unlink(path)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    trio.run(main, sys.argv[1], sys.argv[2])
