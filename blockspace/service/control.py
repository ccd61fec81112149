"""The control socket: one JSON object per line each way.

Request: {"op": "status", ...args}. Reply: {"ok": true, "result": ...} or
{"ok": false, "error": "one line", "kind": "InvalidInput"}. The socket is 0600: only
root (the daemon's user) may talk to it.
"""

import contextlib
import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

from blockspace.errors import BlockspaceError, InvalidInput, NoSpace

log = logging.getLogger(__name__)

Handler = Callable[[dict[str, Any]], Awaitable[Any]]
MAX_LINE = 1 << 20
ERROR_KINDS: dict[str, type[BlockspaceError]] = {
    "InvalidInput": InvalidInput,
    "NoSpace": NoSpace,
    "BlockspaceError": BlockspaceError,
}


async def serve(
    path: Path, handler: Handler, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)  # a stale socket left by a daemon that died
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)  # the socket is born 0600: no window where others can connect
    try:
        await sock.bind(str(path))
    finally:
        os.umask(old_umask)
    sock.listen(16)
    listener = trio.SocketListener(sock)
    task_status.started()
    try:
        async def on_client(stream: trio.SocketStream) -> None:
            await _client(stream, handler)

        await trio.serve_listeners(on_client, [listener])
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


async def _client(stream: trio.SocketStream, handler: Handler) -> None:
    buffer = b""
    async with stream:
        while True:
            try:
                chunk = await stream.receive_some(65536)
            except trio.BrokenResourceError:
                return
            if not chunk:
                return
            buffer += chunk
            if len(buffer) > MAX_LINE:
                await _send(stream, {"ok": False, "error": "request too long"})
                return
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                await _send(stream, await _answer(line, handler))


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
    except trio.BrokenResourceError:
        pass


def request(path: Path, op: str, timeout: float = 600.0, **args: Any) -> Any:
    """Blocking client for the CLI: send one request, return its result or raise."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
        except OSError as error:
            raise BlockspaceError(
                f"cannot reach the pool daemon at {path}: {error.strerror}"
            ) from None
        data = b""
        try:
            sock.sendall(json.dumps({"op": op, **args}).encode() + b"\n")
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
