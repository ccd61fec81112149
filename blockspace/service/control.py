"""The control socket: one JSON object per line each way.

Request: {"op": "status", ...args}. Reply: {"ok": true, "result": ...} or
{"ok": false, "error": "one line", "kind": "InvalidInput"}. The socket is 0600: only
root (the daemon's user) may talk to it.

Bounded: at most `max_clients` connections are served at once (one more is answered with an
error line and closed), a request line longer than `max_line` bytes closes its connection
with an error, and the listen backlog holds more than the cap, so connections arriving
together wait in the kernel instead of failing with EAGAIN. What is held at any time is
at most `max_clients * (max_line + 1)` bytes of unfinished lines; `statistics()` counts it.
"""

import contextlib
import errno
import json
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from blockspace.errors import BlockspaceError, InvalidInput, NoSpace

log = logging.getLogger(__name__)

Handler = Callable[[dict[str, Any]], Awaitable[Any]]
MAX_LINE = 1 << 20  # bytes of one request line, without its newline
MAX_CLIENTS = 64
BACKLOG = 512  # > MAX_CLIENTS; the kernel caps it at net.core.somaxconn
RECEIVE_SIZE = 65536
# accept() failing for want of a resource: wait and retry, as trio.serve_listeners does.
ACCEPT_CAPACITY_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
ERROR_KINDS: dict[str, type[BlockspaceError]] = {
    "InvalidInput": InvalidInput,
    "NoSpace": NoSpace,
    "BlockspaceError": BlockspaceError,
}


@dataclass(frozen=True)
class ControlStatistics:
    clients: int  # connections being served now
    refused: int  # connections turned away (over max_clients) since the server started
    buffered_bytes: int  # bytes of unfinished request lines held, all connections together
    max_clients: int
    max_line: int


class ControlServer:
    """The daemon's side of the socket: `await server.serve(path)` until cancelled."""

    def __init__(
        self, handler: Handler, *, max_clients: int = MAX_CLIENTS, max_line: int = MAX_LINE,
        backlog: int = BACKLOG,
    ) -> None:
        if not 0 < max_clients <= backlog:
            raise ValueError("the listen backlog must hold at least max_clients connections")
        self.handler = handler
        self.max_clients = max_clients
        self.max_line = max_line
        self.backlog = backlog
        self._clients = 0
        self._refused = 0
        self._buffered = 0

    def statistics(self) -> ControlStatistics:
        return ControlStatistics(self._clients, self._refused, self._buffered,
                                 self.max_clients, self.max_line)

    async def serve(
        self, path: Path, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # a stale socket left by a daemon that died
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)  # the socket is born 0600: no window where others connect
        try:
            await sock.bind(str(path))
        finally:
            os.umask(old_umask)
        sock.listen(self.backlog)
        listener = trio.SocketListener(sock)
        task_status.started()
        try:
            async with listener, trio.open_nursery() as nursery:
                while True:
                    stream = await self._accept(listener)
                    if self._clients >= self.max_clients:
                        self._refused += 1
                        await self._refuse(stream)
                        continue
                    self._clients += 1
                    nursery.start_soon(self._client, stream)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    async def _accept(self, listener: trio.SocketListener) -> trio.SocketStream:
        while True:
            try:
                return await listener.accept()
            except OSError as error:
                if error.errno not in ACCEPT_CAPACITY_ERRNOS:
                    raise
                log.error("control socket: accept failed (%s); retrying in 0.1 s",
                          os.strerror(error.errno))
                await trio.sleep(0.1)

    async def _refuse(self, stream: trio.SocketStream) -> None:
        """One error line and close, without waiting on the client: a fresh socket's send
        buffer takes the line at once."""
        with trio.move_on_after(1):
            await _send(stream, {
                "ok": False, "kind": "BlockspaceError",
                "error": f"the pool daemon is busy: {self.max_clients} control connections "
                         "are open; try again",
            })
        with trio.CancelScope(shield=True):
            await stream.aclose()

    async def _client(self, stream: trio.SocketStream) -> None:
        buffer = bytearray()
        try:
            async with stream:
                while True:
                    room = self.max_line + 1 - len(buffer)  # a full line and its newline
                    try:
                        chunk = await stream.receive_some(min(RECEIVE_SIZE, room))
                    except trio.BrokenResourceError:
                        return
                    if not chunk:
                        return
                    scanned = len(buffer)
                    buffer += chunk
                    self._buffered += len(chunk)
                    while (end := buffer.find(b"\n", scanned)) >= 0:
                        line = bytes(buffer[:end])
                        del buffer[:end + 1]
                        self._buffered -= end + 1
                        scanned = 0
                        await _send(stream, await _answer(line, self.handler))
                    if len(buffer) > self.max_line:
                        await _send(stream, {
                            "ok": False, "kind": "InvalidInput",
                            "error": f"request too long (more than {self.max_line} bytes)",
                        })
                        return
        finally:
            self._buffered -= len(buffer)
            self._clients -= 1


async def serve(
    path: Path, handler: Handler, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """A ControlServer with the default limits on `path`."""
    await ControlServer(handler).serve(path, task_status=task_status)


async def _answer(line: bytes, handler: Handler) -> dict[str, Any]:
    try:
        request = json.loads(line)
        if not isinstance(request, dict) or not isinstance(request.get("op"), str):
            raise InvalidInput("a request is a JSON object with an 'op' string")
        return {"ok": True, "result": await handler(request)}
    except BlockspaceError as error:
        return {"ok": False, "error": str(error), "kind": type(error).__name__}
    except ValueError as error:
        return {"ok": False, "error": f"bad request: {error}", "kind": "InvalidInput"}
    except Exception as error:  # one failed request must not take the daemon down
        log.exception("control request failed")
        return {"ok": False, "error": f"internal error: {error}", "kind": "BlockspaceError"}


async def _send(stream: trio.SocketStream, reply: dict[str, Any]) -> None:
    try:
        await stream.send_all(json.dumps(reply).encode() + b"\n")
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


def _connect(sock: socket.socket, path: Path, deadline: float) -> None:
    """connect(), waiting while the listen backlog is full (EAGAIN on a Unix socket)."""
    while True:
        try:
            sock.connect(str(path))
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise TimeoutError(errno.ETIMEDOUT, "its listen backlog stayed full") from None
            time.sleep(0.01)


def request(path: Path, op: str, timeout: float = 600.0, **args: Any) -> Any:
    """Blocking client for the CLI: send one request, return its result or raise."""
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            _connect(sock, path, deadline)
        except OSError as error:
            raise BlockspaceError(
                f"cannot reach the pool daemon at {path}: {error.strerror or error}"
            ) from None
        data = b""
        try:
            try:
                sock.sendall(json.dumps({"op": op, **args}).encode() + b"\n")
            except BrokenPipeError:
                pass  # closed on us: a refusal (busy) may still be there to read
            while not data.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    raise BlockspaceError(
                        "the pool daemon closed the connection without answering"
                    )
                data += chunk
        except OSError as error:  # reset, broken pipe, timeout: the daemon died or hung
            raise BlockspaceError(f"the pool daemon did not answer: {error}") from None
    try:
        reply = json.loads(data)
        if not isinstance(reply, dict):
            raise ValueError("not an object")
    except ValueError as error:
        raise BlockspaceError(f"the pool daemon sent a malformed reply: {error}") from None
    if not reply.get("ok"):
        raise ERROR_KINDS.get(reply.get("kind", ""), BlockspaceError)(reply.get("error", "?"))
    return reply.get("result")
