"""The NBD export: the daemon's volumes as network block devices (qemu, nbd-client, libnbd).

The wire format is blockspace/service/nbd_protocol.py; this module is the trio server. Export
names are volume names, looked up in the same mapping the FUSE adapter serves, so a volume
can be used through its file and through NBD at once (both end in the same `Volume`).

One connection: the handshake (bounded in time), then requests read one after the other and
carried out by up to `max_in_flight` worker tasks that take them in turn (work_queue.py: no
task spawned per request), so several are in flight and replies leave in the order they
finish; one writer task per connection sends the replies gathered meanwhile in one go (at
queue depth 16 that is what lifts a connection from ~10k to ~35k requests a second: a send
and a trip through the scheduler per reply were the cost). What is held is bounded: at most
`max_in_flight` requests and `connection_budget` bytes of request and reply data per
connection, `buffer_budget` bytes over all connections, `max_connections` connections; a
client that stops reading its replies for `send_timeout` seconds is disconnected.

FLUSH is the volume's flush, which flushes every usable disk of the pool: it covers writes
acknowledged on every connection, so NBD_FLAG_CAN_MULTI_CONN is advertised. FUA flushes the
same way before the reply. TRIM and WRITE_ZEROES (without NO_HOLE) are the volume's discard
(blockspace/volume/discard.py): whole slabs of a thin volume are unmapped, their space back in
the pool, durably before the reply; the rest is zeroed through the volume. WRITE_ZEROES with
NO_HOLE, and a volume with no discard of its own (a tiered one), get zeros written.

Structured replies only for a client that asks (NBD_OPT_STRUCTURED_REPLY; libnbd and qemu
do): its reads are answered in chunks, the slabs of a thin volume that are not mapped as
OFFSET_HOLE (nothing read, nothing sent), the rest as OFFSET_DATA, a failure as an ERROR chunk
with its message; and once it selected `base:allocation`, NBD_CMD_BLOCK_STATUS tells it the
holes (`qemu-img map`, `nbdinfo --map`, nbdcopy's skipping of zeros). Other commands keep
their simple replies, which the spec allows.

A bad client (garbage, an oversized or out-of-range request, a disconnect in the middle of
one) gets an NBD error or a closed connection; the volume and the other connections go on.
"""

import contextlib
import errno
import logging
import os
import socket
import stat
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import trio

from blockspace.errors import BlockspaceError, InvalidInput, NoSpace
from blockspace.service import nbd_protocol as wire
from blockspace.service.iostats import IoStats
from blockspace.service.nbd_extents import (
    AllocationMap,
    Segment,
    all_data,
    allocation_extents,
    segments,
)
from blockspace.service.work_queue import WorkQueue
from blockspace.volume.discard import write_zeros

log = logging.getLogger(__name__)

MAX_CONNECTIONS = 64
MAX_IN_FLIGHT = 32  # requests per connection
BUFFER_BUDGET = 256 << 20  # bytes of write payloads and read replies held, all connections
CONNECTION_BUDGET = 64 << 20  # the same, one connection (one client cannot take it all)
SEND_TIMEOUT = 60.0  # seconds a reply may wait for a client that does not read
HANDSHAKE_TIMEOUT = 30.0  # seconds a client may take to choose an export
RECEIVE_BUFFER = 256 << 10
SMALL_REPLY = 64 << 10  # a read reply up to this size goes out in one send with its header
BACKLOG = 128
ACCEPT_CAPACITY_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}


class ExportedVolume(Protocol):
    """What an export serves: a plain `Volume` (blockspace/volume/volume.py) or a
    `TieredVolume` (blockspace/tiering/tiered_volume.py). The FUSE adapter's `ServedVolume`
    asks for more (the slab map, for a file's block count) and takes only bytes to write;
    this one needs less and hands the volume its receive buffers without a copy."""

    @property
    def name(self) -> str: ...

    @property
    def size(self) -> int: ...

    async def read(self, offset: int, length: int) -> bytes | bytearray: ...

    async def write(self, offset: int, data: bytes | bytearray | memoryview) -> None: ...

    async def flush(self) -> None: ...


@runtime_checkable
class DiscardingVolume(Protocol):
    """An export that can give space back (a plain `Volume`)."""

    async def discard(self, offset: int, length: int, *, unmap: bool = True) -> None: ...


def error_value(error: BlockspaceError) -> int:
    """The NBD error a failed volume call answers with."""
    if isinstance(error, NoSpace):
        return wire.ENOSPC
    if isinstance(error, InvalidInput):
        return wire.EINVAL
    return wire.nbd_errno(int(getattr(error, "errno", errno.EIO) or errno.EIO))


# ---- where it listens ------------------------------------------------------------------

@dataclass(frozen=True)
class UnixAddress:
    path: Path

    def __str__(self) -> str:
        return str(self.path)


@dataclass(frozen=True)
class TcpAddress:
    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp:{host}:{self.port}"


ListenAddress = UnixAddress | TcpAddress


def parse_address(text: str) -> ListenAddress:
    """`tcp:HOST:PORT` (`tcp:[::1]:PORT` for IPv6) or a Unix socket path."""
    if not text.startswith("tcp:"):
        if not text or "\0" in text:
            raise InvalidInput(f"bad NBD socket path {text!r}")
        return UnixAddress(Path(os.path.abspath(text)))
    rest = text[4:]
    host, sep, port_text = rest.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise InvalidInput(f"bad NBD address {text!r} (expected tcp:HOST:PORT)")
    return TcpAddress(host, int(port_text))


def default_socket_path(run_dir: Path, pool: str) -> Path:
    """Next to the pool's control socket (`POOL.sock` in the state directory's run/)."""
    return run_dir / f"{pool}.nbd.sock"


# ---- statistics ------------------------------------------------------------------------

@dataclass(frozen=True)
class NbdStatistics:
    address: str  # where it listens ("" before it does)
    connections: int  # open now, handshaking or transmitting
    refused: int  # turned away over max_connections
    exports: dict[str, int]  # volume name -> connections transmitting on it
    requests: int  # answered since the start
    errors: int  # of those, answered with an NBD error
    broken_clients: int  # connections closed for breaking the protocol
    bytes_read: int
    bytes_written: int
    buffered_bytes: int  # request payloads and read replies held now

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---- the server ------------------------------------------------------------------------

@dataclass(frozen=True)
class _Export:
    name: str
    volume: ExportedVolume
    limits: wire.ExportLimits
    flags: int
    structured: bool = False  # the client negotiated structured replies
    allocation: AllocationMap | None = None  # where holes are known (a plain volume)

    def segments(self, offset: int, length: int) -> list[Segment]:
        if self.allocation is None:
            return all_data(offset, length)
        return segments(self.allocation.slab_data_size, offset, length,
                        self.allocation.is_mapped)


# One reply on the wire: pieces of (header, data to send after it without a copy), and what
# its request held, released once the last piece has gone.
_Piece = tuple[bytes, bytes | bytearray | None]


class _Disconnected(Exception):
    """The client closed or reset the connection in the middle of a message."""


class _ByteBudget:
    """A counted limit that takes any amount at once (a semaphore of single units would let
    two waiters each hold part of what they need)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._waiters = trio.lowlevel.ParkingLot()

    async def acquire(self, amount: int) -> None:
        while self.used + amount > self.limit:
            await self._waiters.park()
        self.used += amount

    def release(self, amount: int) -> None:
        self.used -= amount
        if self._waiters:  # unparking no one still costs a trip through it
            self._waiters.unpark_all()


class _Receiver:
    """Exact-size reads from a socket, through one buffer (a request header is 28 bytes: one
    recv per header would cost a syscall each); a large payload is received in place."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self._socket = stream.socket
        self._buffer = bytearray(RECEIVE_BUFFER)
        self._view = memoryview(self._buffer)
        self._start = self._end = 0

    async def receive(self, size: int, *, at_boundary: bool = False) -> bytearray | None:
        """Exactly `size` bytes; None if `at_boundary` and the peer closed before sending
        any. A close or reset in the middle raises `_Disconnected`."""
        buffered = self._end - self._start
        if size > len(self._buffer):
            out = bytearray(size)
            view = memoryview(out)
            view[:buffered] = self._view[self._start : self._end]
            self._start = self._end = 0
            filled = buffered
            while filled < size:  # a payload: never at a message boundary
                filled += await self._recv_into(view[filled:], size, False)
            return out
        if buffered < size:
            if self._start:  # make room at the end
                self._view[:buffered] = self._view[self._start : self._end]
                self._start, self._end = 0, buffered
            while self._end - self._start < size:
                got = await self._recv_into(self._view[self._end :], size,
                                            at_boundary and self._end == self._start)
                if got == 0:
                    return None
                self._end += got
        out = bytearray(self._view[self._start : self._start + size])
        self._start += size
        return out

    async def _recv_into(self, view: memoryview, size: int, may_end: bool) -> int:
        try:
            got = await self._socket.recv_into(view)
        except OSError as error:  # ECONNRESET and the like
            raise _Disconnected(os.strerror(error.errno or errno.EIO)) from None
        if got == 0 and not may_end:
            raise _Disconnected(f"closed in the middle of a {size}-byte message")
        return got


class _Connection:
    """One client in transmission: the bounds its requests share, and its replies.

    A request holds a slot and its bytes (a write's payload, a read's reply) from the moment
    its header is read until its reply has left. Replies are queued and one writer task
    sends whatever has gathered in one go, so requests finishing together cost one send; a
    small reply to the only request in flight, with nothing queued, is written at once
    instead (at queue depth 1 waking the writer was a task switch per request).
    A client gone makes the writer drop replies; a client that takes no reply for
    `send_timeout` seconds is treated as gone, and its socket is shut down, which ends the
    reading of its requests too."""

    def __init__(self, stream: trio.SocketStream, export: _Export, *, slots: int,
                 budget: int, shared: _ByteBudget, send_timeout: float) -> None:
        self.export = export
        self._stream = stream
        self._fd = stream.socket.fileno()
        self._slots = self._max_slots = slots
        self._sending = False  # the writer is in the middle of a batch
        self._budget = _ByteBudget(budget)
        self._shared = shared  # every connection's
        self._send_timeout = send_timeout
        self._waiters = trio.lowlevel.ParkingLot()
        self._replies: list[tuple[bytes, bytes | bytearray | None, int | None]] = []
        self._closing = False
        self.broken = False
        self.stuck = False

    async def acquire(self, held: int) -> None:
        """A slot and `held` bytes; parks only when one is short (no checkpoint otherwise,
        so the headers of a batch are read without a trip through the scheduler each)."""
        while not self._slots:
            await self._waiters.park()
        self._slots -= 1
        try:
            await self._budget.acquire(held)
            try:
                await self._shared.acquire(held)
            except BaseException:
                self._budget.release(held)
                raise
        except BaseException:
            self._release_slot()
            raise

    def release(self, held: int) -> None:
        self._shared.release(held)
        self._budget.release(held)
        self._release_slot()

    def _release_slot(self) -> None:
        self._slots += 1
        if self._waiters:
            self._waiters.unpark_all()

    def reply(self, error: int, handle: int, data: bytes | bytearray | None, held: int) -> None:
        """Queue a simple reply; what its request held is released once it is sent (or
        dropped)."""
        if self.broken:
            self.release(held)
            return
        header = wire.encode_simple_reply(error, handle)
        if self._send_now([header, data] if data else [header], held):
            return
        self._replies.append((header, data, held))
        if self._waiters:
            self._waiters.unpark_all()

    def reply_pieces(self, pieces: list[_Piece], held: int) -> None:
        """Queue a reply of several pieces (structured chunks), kept together and in order;
        what the request held goes with the last."""
        if self.broken:
            self.release(held)
            return
        if self._send_now([part for piece in pieces for part in piece if part], held):
            return
        last = len(pieces) - 1
        self._replies.extend((header, data, held if index == last else None)
                             for index, (header, data) in enumerate(pieces))
        if self._waiters:
            self._waiters.unpark_all()

    def _send_now(self, buffers: list[bytes | bytearray], held: int) -> bool:
        """Write a reply without the writer task if it is small, the only request in flight,
        and nothing is queued or being sent (so no reply can be cut into); False when it
        must be queued. The socket is non-blocking: a full one queues the rest."""
        if self._sending or self._replies or self._max_slots - self._slots != 1:
            return False
        total = sum(len(buffer) for buffer in buffers)
        if total > SMALL_REPLY:
            return False
        try:
            sent = os.writev(self._fd, buffers)
        except BlockingIOError:
            return False
        except OSError:  # EPIPE, ECONNRESET: the client is gone
            self.broken = True
            self.release(held)
            return True
        if sent < total:  # rare: the socket's buffer was nearly full
            self._replies.append((b"".join(buffers)[sent:], None, held))
            if self._waiters:
                self._waiters.unpark_all()
        else:
            self.release(held)
        return True

    def close(self) -> None:
        """No more replies will come: the writer sends what is queued and returns."""
        self._closing = True
        if self._waiters:
            self._waiters.unpark_all()

    async def run_writer(self) -> None:
        while True:
            while not self._replies:
                if self._closing:
                    return
                await self._waiters.park()
            batch, self._replies = self._replies, []
            self._sending = True
            try:
                if not self.broken:
                    await self._send(batch)
            finally:
                self._sending = False
                for _, _, held in batch:
                    if held is not None:
                        self.release(held)

    async def _send(self, batch: list[tuple[bytes, bytes | bytearray | None, int | None]]
                    ) -> None:
        with trio.move_on_after(self._send_timeout) as scope:
            try:
                small: list[bytes | bytearray] = []
                for header, data, _ in batch:
                    small.append(header)
                    if data is None or len(data) <= SMALL_REPLY:
                        if data:
                            small.append(data)
                        continue
                    await self._stream.send_all(b"".join(small))
                    small = []
                    await self._stream.send_all(data)  # a large read: not copied
                if small:
                    await self._stream.send_all(b"".join(small))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self.broken = True
        if scope.cancelled_caught:
            self.broken = self.stuck = True
            with contextlib.suppress(OSError):
                self._stream.socket.shutdown(socket.SHUT_RDWR)


class NbdServer:
    """`await server.serve(address)` until cancelled. `volumes` is called on every lookup
    and request, so volumes created or deleted while mounted are seen at once."""

    def __init__(
        self,
        volumes: Callable[[], Mapping[str, ExportedVolume]],
        *,
        read_only: bool = False,
        max_connections: int = MAX_CONNECTIONS,
        max_in_flight: int = MAX_IN_FLIGHT,
        buffer_budget: int = BUFFER_BUDGET,
        connection_budget: int = CONNECTION_BUDGET,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
        send_timeout: float = SEND_TIMEOUT,
        block_sizes: wire.BlockSizes | None = None,
        io: IoStats | None = None,
    ) -> None:
        block_sizes = block_sizes or wire.BlockSizes()
        self.io = io  # the daemon's per-volume counters, shared with the FUSE files
        if min(buffer_budget, connection_budget) < block_sizes.maximum:
            raise ValueError("the buffer budgets must hold one request of the largest size")
        self._volumes = volumes
        self.read_only = read_only
        self.max_connections = max_connections
        self.max_in_flight = max_in_flight
        self.connection_budget = connection_budget
        self.handshake_timeout = handshake_timeout
        self.send_timeout = send_timeout
        self.block_sizes = block_sizes
        self._budget = _ByteBudget(buffer_budget)
        self._address = ""
        self._connections = 0
        self._refused = 0
        self._exports: Counter[str] = Counter()
        self._requests = self._errors = self._broken = 0
        self._bytes_read = self._bytes_written = 0

    # ---- what the daemon asks -----------------------------------------------------------

    @property
    def address(self) -> str:
        return self._address

    def is_open(self, name: str) -> bool:
        """Whether a connection is transmitting on volume `name` (it must not be deleted)."""
        return self._exports[name] > 0

    def statistics(self) -> NbdStatistics:
        return NbdStatistics(
            self._address, self._connections, self._refused,
            {name: count for name, count in sorted(self._exports.items()) if count},
            self._requests, self._errors, self._broken, self._bytes_read,
            self._bytes_written, self._budget.used,
        )

    # ---- listening ----------------------------------------------------------------------

    async def serve(
        self, address: ListenAddress, owner: tuple[int, int] | None = None, *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen on `address` (a Unix socket is made 0600, and given to `owner`, a
        (uid, gid), when one is named) and serve until cancelled."""
        if isinstance(address, UnixAddress):
            listeners = [await _unix_listener(address.path, owner)]
        else:
            listeners = await _tcp_listeners(address)
        self._address = _describe(address, listeners)
        log.info("NBD export listening on %s", self._address)
        task_status.started()
        try:
            async with trio.open_nursery() as nursery:
                for listener in listeners:
                    nursery.start_soon(self._accept_loop, listener, nursery)
        finally:
            with trio.CancelScope(shield=True):
                for listener in listeners:
                    await listener.aclose()
            if isinstance(address, UnixAddress):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(address.path)

    async def _accept_loop(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        while True:
            try:
                stream = await listener.accept()
            except OSError as error:
                if error.errno not in ACCEPT_CAPACITY_ERRNOS:
                    raise
                log.error("NBD: accept failed (%s); retrying in 0.1 s",
                          os.strerror(error.errno))
                await trio.sleep(0.1)
                continue
            if self._connections >= self.max_connections:
                self._refused += 1
                log.warning("NBD: %d connections open, one more refused", self._connections)
                with trio.CancelScope(shield=True):
                    await stream.aclose()
                continue
            self._connections += 1
            nursery.start_soon(self.handle_connection, stream)

    # ---- one connection -----------------------------------------------------------------

    async def handle_connection(self, stream: trio.SocketStream) -> None:
        """Serve one client to its end. Nothing a client does raises out of here: a broken
        protocol or a disconnect ends the connection, and so does (logged, with its
        traceback) an unexpected error of a request, never the daemon."""
        try:
            async with stream:
                receiver = _Receiver(stream)
                export = None
                with trio.move_on_after(self.handshake_timeout) as scope:
                    export = await self._handshake(stream, receiver)
                if scope.cancelled_caught:
                    log.warning("NBD: a client took more than %gs to choose an export",
                                self.handshake_timeout)
                if export is not None:
                    self._exports[export.name] += 1
                    try:
                        await self._transmission(stream, receiver, export)
                    finally:
                        self._exports[export.name] -= 1
        except wire.ProtocolError as error:
            self._broken += 1
            log.warning("NBD: closing a client that broke the protocol: %s", error)
        except _Disconnected as error:
            log.info("NBD: a client went away during the handshake: %s", error)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            log.info("NBD: a client went away during the handshake")
        except Exception:  # a bug in a request's handling: this client only
            log.exception("NBD: connection failed")
        finally:
            self._connections -= 1

    async def _handshake(
        self, stream: trio.SocketStream, receiver: _Receiver
    ) -> _Export | None:
        """Fixed newstyle negotiation; the export chosen, or None when the client aborts."""
        await stream.send_all(wire.greeting())
        client = wire.decode_client_flags(await self._exactly(receiver, wire.CLIENT_FLAGS_SIZE))
        structured = False
        selected: str | None = None  # the export base:allocation was selected for
        while True:
            header = wire.decode_option_header(
                await self._exactly(receiver, wire.OPTION_HEADER_SIZE))
            data = await self._exactly(receiver, header.length) if header.length else b""
            option = header.option
            if option == wire.OPT_EXPORT_NAME:
                try:
                    name = wire.decode_export_name(data)
                except wire.OptionInvalid as error:
                    raise wire.ProtocolError(str(error)) from None
                export = self._export(name, structured=structured,
                                      block_status=selected == name)
                if export is None:  # this option cannot answer an error: only a close
                    log.warning("NBD: a client asked for volume %r, which does not exist", name)
                    return None
                await stream.send_all(wire.encode_export_name_reply(
                    export.limits.size, export.flags, no_zeroes=client.no_zeroes))
                return export
            if option == wire.OPT_ABORT:
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await stream.send_all(wire.encode_option_reply(option, wire.REP_ACK))
                return None
            if option == wire.OPT_LIST:
                await stream.send_all(self._list_reply(data))
            elif option in (wire.OPT_INFO, wire.OPT_GO):
                export, reply = self._info_reply(option, data, structured=structured,
                                                 selected=selected)
                await stream.send_all(reply)
                if option == wire.OPT_GO and export is not None:
                    return export
            elif option == wire.OPT_STRUCTURED_REPLY:
                if data:
                    reply = wire.encode_error_reply(option, wire.REP_ERR_INVALID,
                                                    "NBD_OPT_STRUCTURED_REPLY takes no data")
                else:
                    structured = True
                    reply = wire.encode_option_reply(option, wire.REP_ACK)
                await stream.send_all(reply)
            elif option in (wire.OPT_LIST_META_CONTEXT, wire.OPT_SET_META_CONTEXT):
                chosen, reply = self._meta_context_reply(option, data, structured)
                if option == wire.OPT_SET_META_CONTEXT:
                    selected = chosen  # replaces what an earlier one selected, even if None
                await stream.send_all(reply)
            else:
                await stream.send_all(wire.encode_error_reply(
                    option, wire.REP_ERR_UNSUP, f"option {option} is not supported"))

    async def _exactly(self, receiver: _Receiver, size: int) -> bytes:
        data = await receiver.receive(size)
        assert data is not None  # not at_boundary: an early end raises _Disconnected
        return bytes(data)

    def _export(self, name: str, *, structured: bool = False,
                block_status: bool = False) -> _Export | None:
        volume = self._volumes().get(name)
        if volume is None:
            return None
        flags = wire.transmission_flags(read_only=self.read_only, multi_conn=True)
        limits = wire.ExportLimits(volume.size, self.read_only, self.block_sizes.maximum,
                                   block_status=structured and block_status)
        allocation = volume if isinstance(volume, AllocationMap) else None
        return _Export(name, volume, limits, flags, structured, allocation)

    def _meta_context_reply(self, option: int, data: bytes,
                            structured: bool) -> tuple[str | None, bytes]:
        """The replies to NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT, and the
        export base:allocation is now selected for (SET only; None: nothing selected)."""
        if not structured:  # the spec: these need structured replies first
            return None, wire.encode_error_reply(
                option, wire.REP_ERR_INVALID, "metadata contexts need structured replies "
                "(NBD_OPT_STRUCTURED_REPLY) first")
        try:
            request = wire.decode_meta_context_request(data)
        except wire.OptionInvalid as error:
            return None, wire.encode_error_reply(option, wire.REP_ERR_INVALID, str(error))
        if request.name not in self._volumes():
            return None, wire.encode_error_reply(
                option, wire.REP_ERR_UNKNOWN, f"no volume {request.name!r} in this pool")
        listing = option == wire.OPT_LIST_META_CONTEXT
        contexts = wire.select_contexts(request.queries, listing=listing)
        # LIST answers id 0 (the spec reserves it there); SET gives each its id.
        context_id = 0 if listing else wire.BASE_ALLOCATION_ID
        replies = [wire.encode_option_reply(option, wire.REP_META_CONTEXT,
                                            wire.encode_meta_context(context_id, context))
                   for context in contexts]
        replies.append(wire.encode_option_reply(option, wire.REP_ACK))
        chosen = request.name if not listing and wire.BASE_ALLOCATION in contexts else None
        return chosen, b"".join(replies)

    def _list_reply(self, data: bytes) -> bytes:
        if data:
            return wire.encode_error_reply(wire.OPT_LIST, wire.REP_ERR_INVALID,
                                           "NBD_OPT_LIST takes no data")
        names = sorted(self._volumes())
        return b"".join(
            [wire.encode_option_reply(wire.OPT_LIST, wire.REP_SERVER,
                                      wire.encode_server_entry(name)) for name in names]
            + [wire.encode_option_reply(wire.OPT_LIST, wire.REP_ACK)]
        )

    def _info_reply(self, option: int, data: bytes, *, structured: bool = False,
                    selected: str | None = None) -> tuple[_Export | None, bytes]:
        try:
            request = wire.decode_info_request(data)
        except wire.OptionInvalid as error:
            return None, wire.encode_error_reply(option, wire.REP_ERR_INVALID, str(error))
        export = self._export(request.name, structured=structured,
                              block_status=selected == request.name)
        if export is None:
            names = ", ".join(sorted(self._volumes())) or "none"
            return None, wire.encode_error_reply(
                option, wire.REP_ERR_UNKNOWN,
                f"no volume {request.name!r} in this pool (volumes: {names})")
        infos = [wire.encode_info_export(export.limits.size, export.flags),
                 # Sent whether asked or not (clients ignore what they did not ask for): it
                 # tells a client the 32 MiB cap it would otherwise have to guess.
                 wire.encode_info_block_size(self.block_sizes)]
        if wire.INFO_NAME in request.infos:
            infos.append(wire.encode_info_name(export.name))
        return export, b"".join(
            [wire.encode_option_reply(option, wire.REP_INFO, info) for info in infos]
            + [wire.encode_option_reply(option, wire.REP_ACK)]
        )

    async def _transmission(
        self, stream: trio.SocketStream, receiver: _Receiver, export: _Export
    ) -> None:
        connection = _Connection(stream, export, slots=self.max_in_flight,
                                 budget=self.connection_budget, shared=self._budget,
                                 send_timeout=self.send_timeout)
        async with trio.open_nursery() as writer:
            writer.start_soon(connection.run_writer)
            try:
                async with trio.open_nursery() as requests:
                    work = WorkQueue(requests, self._answer, workers=self.max_in_flight)
                    try:
                        await self._read_requests(receiver, connection, work)
                    except wire.ProtocolError as error:
                        self._broken += 1
                        log.warning("NBD: closing a client of %r that broke the protocol: "
                                    "%s", export.name, error)
                    except _Disconnected as error:
                        if not connection.stuck:
                            log.info("NBD: a client of %r went away mid-request: %s",
                                     export.name, error)
                    finally:
                        work.close()
                    # The requests in flight finish (and answer, if the client is still
                    # there) before the connection closes.
            finally:
                connection.close()
        if connection.stuck:
            log.warning("NBD: a client of %r read no reply for %gs: disconnected",
                        export.name, self.send_timeout)

    async def _read_requests(
        self, receiver: _Receiver, connection: _Connection, work: WorkQueue
    ) -> None:
        while True:
            header = await receiver.receive(wire.REQUEST_HEADER_SIZE, at_boundary=True)
            if header is None:
                return  # closed between requests
            request = wire.decode_request(header)
            if request.command == wire.CMD_DISC:
                return
            error = wire.request_error(request, connection.export.limits)
            held = request.payload_length
            if request.command == wire.CMD_READ and not error:
                held = request.length
            await connection.acquire(held)
            try:
                payload = (await receiver.receive(request.payload_length)
                           if request.payload_length else None)
            except BaseException:
                connection.release(held)
                raise
            work.submit(request, payload, error, connection, held)

    async def _answer(
        self, request: wire.Request, payload: bytearray | None, error: int,
        connection: _Connection, held: int,
    ) -> None:
        data: bytes | bytearray | None = None
        export = connection.export
        try:
            if export.structured and request.command in (wire.CMD_READ,
                                                          wire.CMD_BLOCK_STATUS):
                error, pieces = await self._structured(request, error, export)
                self._requests += 1
                self._errors += bool(error)
                connection.reply_pieces(pieces, held)
                return
            if not error:
                error, data = await self._carry_out(request, payload, export)
        except BaseException:
            connection.release(held)
            raise
        self._requests += 1
        if error:
            self._errors += 1
            data = None
        connection.reply(error, request.handle, data, held)

    async def _structured(self, request: wire.Request, error: int,
                          export: _Export) -> tuple[int, list[_Piece]]:
        """A READ or BLOCK_STATUS answered in structured chunks: an error as one ERROR
        chunk, a read as its data and its holes (all read before the first chunk is queued,
        so none is marked done before an error could be known)."""
        handle = request.handle
        if error:
            return error, [(wire.encode_structured_error(
                handle, error, f"{request.describe()}: refused"), None)]
        if self._volumes().get(export.name) is not export.volume:
            log.error("NBD: volume %r is no longer served; failing %s", export.name,
                      request.describe())
            return wire.EIO, [(wire.encode_structured_error(
                handle, wire.EIO, f"volume {export.name!r} is no longer served"), None)]
        parts = export.segments(request.offset, request.length)
        if request.command == wire.CMD_BLOCK_STATUS:
            extents = allocation_extents(parts, one=bool(request.flags & wire.CMD_FLAG_REQ_ONE))
            return 0, [(wire.encode_block_status(handle, wire.BASE_ALLOCATION_ID, extents),
                        None)]
        if not parts:  # a read of 0 bytes
            return 0, [(wire.encode_structured_none(handle), None)]
        # One read of the volume per run of mapped slabs; counted once, as the client sees it.
        began = time.perf_counter()
        datas: list[bytes | bytearray | None] = []
        try:
            for part in parts:
                datas.append(await export.volume.read(part.offset, part.length)
                             if part.mapped else None)
        except BlockspaceError as failure:
            log.error("NBD: %s on %r failed: %s", request.describe(), export.name, failure)
            self._count(export.name, wire.CMD_READ, 0, began, True)
            return error_value(failure), [(wire.encode_structured_error(
                handle, error_value(failure), f"{request.describe()} failed",
                offset=parts[len(datas)].offset), None)]
        self._bytes_read += request.length
        self._count(export.name, wire.CMD_READ, request.length, began, False)
        last = len(parts) - 1
        pieces: list[_Piece] = []
        for index, (part, data) in enumerate(zip(parts, datas, strict=True)):
            done = index == last
            if data is None:
                pieces.append((wire.encode_offset_hole(handle, part.offset, part.length,
                                                       done=done), None))
            else:
                pieces.append((wire.encode_offset_data_header(handle, part.offset, part.length,
                                                              done=done), data))
        return 0, pieces

    async def _carry_out(
        self, request: wire.Request, payload: bytearray | None, export: _Export
    ) -> tuple[int, bytes | bytearray | None]:
        volume = export.volume
        if self._volumes().get(export.name) is not volume:
            log.error("NBD: volume %r is no longer served; failing %s", export.name,
                      request.describe())
            return wire.EIO, None
        command, offset, length = request.command, request.offset, request.length
        began = time.perf_counter()
        try:
            if command == wire.CMD_READ:
                data = await volume.read(offset, length)
                self._bytes_read += length
                self._count(export.name, command, length, began, False)
                return 0, data
            if command == wire.CMD_WRITE:
                assert payload is not None
                await volume.write(offset, payload)
                self._bytes_written += length
            elif command in (wire.CMD_TRIM, wire.CMD_WRITE_ZEROES):
                # NO_HOLE: the space stays allocated, zeros are written.
                hole = not request.flags & wire.CMD_FLAG_NO_HOLE
                if isinstance(volume, DiscardingVolume):
                    await volume.discard(offset, length, unmap=hole)
                else:
                    await write_zeros(volume, offset, length)
            if command == wire.CMD_FLUSH or request.flags & wire.CMD_FLAG_FUA:
                await volume.flush()
        except BlockspaceError as failure:
            log.error("NBD: %s on %r failed: %s", request.describe(), export.name, failure)
            self._count(export.name, command, 0, began, True)
            return error_value(failure), None
        self._count(export.name, command, 0 if command == wire.CMD_FLUSH else length, began,
                    False)
        return 0, None

    def _count(self, name: str, command: int, nbytes: int, began: float, failed: bool) -> None:
        if self.io is None:
            return
        io = self.io.volume(name)
        counter = io.read if command == wire.CMD_READ else \
            io.flush if command == wire.CMD_FLUSH else io.write
        counter.add(nbytes, time.perf_counter() - began, failed)


# ---- sockets ---------------------------------------------------------------------------

async def _unix_listener(path: Path, owner: tuple[int, int] | None) -> trio.SocketListener:
    await _clear_stale_socket(path)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)  # born 0600: no moment in which others may connect
    try:
        await sock.bind(str(path))
        if owner is not None and owner != (os.geteuid(), os.getegid()):
            os.chown(path, *owner)
    except OSError as error:
        sock.close()
        raise BlockspaceError(f"cannot listen on {path}: {error.strerror or error}") from None
    finally:
        os.umask(old_umask)
    sock.listen(BACKLOG)
    return trio.SocketListener(sock)


async def _clear_stale_socket(path: Path) -> None:
    """Remove a socket left by a daemon that died; refuse anything else at `path`."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as error:
        raise BlockspaceError(f"cannot use {path} for the NBD socket: {error.strerror}") from None
    if not stat.S_ISSOCK(mode):
        raise InvalidInput(f"{path} exists and is not a socket; not replacing it with the "
                           "NBD socket")
    probe = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await probe.connect(str(path))
    except OSError:
        os.unlink(path)  # nobody listens there
        return
    finally:
        probe.close()
    raise InvalidInput(f"{path} is in use by another server")


async def _tcp_listeners(address: TcpAddress) -> list[trio.SocketListener]:
    try:
        return await trio.open_tcp_listeners(address.port, host=address.host, backlog=BACKLOG)
    except OSError as error:
        raise BlockspaceError(f"cannot listen on {address}: {error.strerror or error}") from None


def _describe(address: ListenAddress, listeners: list[trio.SocketListener]) -> str:
    if isinstance(address, UnixAddress):
        return str(address)
    host, port = listeners[0].socket.getsockname()[:2]  # the port chosen for port 0
    return str(TcpAddress(host, port))
