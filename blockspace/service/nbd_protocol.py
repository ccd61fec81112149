"""The NBD wire format (doc/proto.md of github.com/NetworkBlockDevice/nbd), without any I/O.

What Blockspace speaks: the fixed newstyle handshake; the options NBD_OPT_EXPORT_NAME,
NBD_OPT_LIST, NBD_OPT_INFO / NBD_OPT_GO (NBD_INFO_EXPORT, NBD_INFO_NAME, NBD_INFO_BLOCK_SIZE)
NBD_OPT_ABORT, NBD_OPT_STRUCTURED_REPLY and NBD_OPT_LIST_META_CONTEXT /
NBD_OPT_SET_META_CONTEXT (the one context `base:allocation`), every other option answered
NBD_REP_ERR_UNSUP; simple replies, and structured replies once the client asked for them
(OFFSET_DATA, OFFSET_HOLE, BLOCK_STATUS, ERROR); the commands READ, WRITE, DISC, FLUSH, TRIM,
WRITE_ZEROES with the FUA and NO_HOLE flags, and BLOCK_STATUS (with REQ_ONE) once a client
selected `base:allocation`.

The server (blockspace/service/nbd.py) reads the byte counts named here and hands the bytes
over. Nothing a client sends is trusted: a message that cannot be framed any more (a wrong
magic, a write payload over the cap, an oversized option) raises `ProtocolError`, after which
the connection is closed; a malformed option raises `OptionInvalid`, answered
NBD_REP_ERR_INVALID; a request that is well framed but wrong (unknown command or flag, past
the end, read-only) is answered with the errno `request_error` gives. Nothing else is raised.
"""

import errno
import struct
from dataclasses import dataclass
from typing import NamedTuple

# ---- magic numbers ---------------------------------------------------------------------
NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT": the newstyle magic, and each option's
OPTION_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

# ---- handshake flags (server, 16 bits) and client flags (32 bits) ----------------------
FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
FLAG_C_FIXED_NEWSTYLE = 1 << 0
FLAG_C_NO_ZEROES = 1 << 1
KNOWN_CLIENT_FLAGS = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES

# ---- transmission flags (16 bits) ------------------------------------------------------
FLAG_HAS_FLAGS = 1 << 0
FLAG_READ_ONLY = 1 << 1
FLAG_SEND_FLUSH = 1 << 2
FLAG_SEND_FUA = 1 << 3
FLAG_ROTATIONAL = 1 << 4
FLAG_SEND_TRIM = 1 << 5
FLAG_SEND_WRITE_ZEROES = 1 << 6
FLAG_SEND_DF = 1 << 7
FLAG_CAN_MULTI_CONN = 1 << 8
FLAG_SEND_RESIZE = 1 << 9
FLAG_SEND_CACHE = 1 << 10
FLAG_SEND_FAST_ZERO = 1 << 11

# ---- options ---------------------------------------------------------------------------
OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10
OPT_EXTENDED_HEADERS = 11

# ---- option replies --------------------------------------------------------------------
REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_ERROR_BIT = 1 << 31
REP_ERR_UNSUP = REP_ERROR_BIT + 1
REP_ERR_POLICY = REP_ERROR_BIT + 2
REP_ERR_INVALID = REP_ERROR_BIT + 3
REP_ERR_PLATFORM = REP_ERROR_BIT + 4
REP_ERR_TLS_REQD = REP_ERROR_BIT + 5
REP_ERR_UNKNOWN = REP_ERROR_BIT + 6
REP_ERR_SHUTDOWN = REP_ERROR_BIT + 7
REP_ERR_BLOCK_SIZE_REQD = REP_ERROR_BIT + 8
REP_ERR_TOO_BIG = REP_ERROR_BIT + 9

# ---- structured replies (chunk flags and types) ----------------------------------------
REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR = (1 << 15) + 1
REPLY_TYPE_ERROR_OFFSET = (1 << 15) + 2
REPLY_TYPE_ERROR_BIT = 1 << 15

# ---- metadata contexts -----------------------------------------------------------------
BASE_ALLOCATION = "base:allocation"
CONTEXTS = (BASE_ALLOCATION,)  # every context this server knows
BASE_ALLOCATION_ID = 1  # the id it is given by NBD_OPT_SET_META_CONTEXT
STATE_HOLE = 1 << 0  # base:allocation: not allocated
STATE_ZERO = 1 << 1  # base:allocation: reads as zeros
MAX_QUERIES = 64  # queries in one meta context option (the option's size bounds them anyway)

# ---- NBD_REP_INFO types ----------------------------------------------------------------
INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

# ---- commands and their flags ----------------------------------------------------------
CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7
COMMAND_NAMES = {
    CMD_READ: "READ", CMD_WRITE: "WRITE", CMD_DISC: "DISC", CMD_FLUSH: "FLUSH",
    CMD_TRIM: "TRIM", CMD_CACHE: "CACHE", CMD_WRITE_ZEROES: "WRITE_ZEROES",
    CMD_BLOCK_STATUS: "BLOCK_STATUS",
}
SERVED_COMMANDS = frozenset({CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_TRIM,
                             CMD_WRITE_ZEROES})
WRITING_COMMANDS = frozenset({CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES})

CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4

# ---- errors (the only values the error field may carry) --------------------------------
EPERM = 1
EIO = 5
ENOMEM = 12
EINVAL = 22
ENOSPC = 28
EOVERFLOW = 75
ENOTSUP = 95
ESHUTDOWN = 108
ERRORS = frozenset({EPERM, EIO, ENOMEM, EINVAL, ENOSPC, EOVERFLOW, ENOTSUP, ESHUTDOWN})

# ---- sizes -----------------------------------------------------------------------------
MAX_PAYLOAD = 32 << 20  # 2**25: the largest READ or WRITE; what the spec says to accept
MAX_STRING = 4096  # export names and messages (the spec's MUST)
MAX_OPTION_LENGTH = 4 + MAX_STRING + 2 + 2 * 64  # NBD_OPT_GO with a long name and 64 infos
CLIENT_FLAGS_SIZE = 4
OPTION_HEADER_SIZE = 16
REQUEST_HEADER_SIZE = 28
SIMPLE_REPLY_SIZE = 16
OPTION_REPLY_HEADER_SIZE = 20
STRUCTURED_REPLY_HEADER_SIZE = 20

_GREETING = struct.Struct(">QQH")
_CLIENT_FLAGS = struct.Struct(">I")
_OPTION_HEADER = struct.Struct(">QII")
_OPTION_REPLY = struct.Struct(">QIII")
_EXPORT_NAME_REPLY = struct.Struct(">QH")
_REQUEST = struct.Struct(">IHHQQI")
_SIMPLE_REPLY = struct.Struct(">IIQ")
_STRUCTURED_REPLY = struct.Struct(">IHHQI")
_OFFSET_DATA = struct.Struct(">IHHQIQ")  # a chunk's header and the data's offset
_OFFSET_HOLE = struct.Struct(">IHHQIQI")
_ERROR_CHUNK = struct.Struct(">IHHQIIH")  # header, error, message length
_EXTENT = struct.Struct(">II")
_INFO_EXPORT = struct.Struct(">HQH")
_INFO_BLOCK_SIZE = struct.Struct(">HIII")


class NbdError(Exception):
    """Base of what this codec raises; nothing else escapes it on any input."""


class ProtocolError(NbdError):
    """The peer broke the protocol so that its stream cannot be followed: close it."""


class OptionInvalid(NbdError):
    """An option the server knows, with data it cannot accept: NBD_REP_ERR_INVALID."""


@dataclass(frozen=True)
class BlockSizes:
    """NBD_INFO_BLOCK_SIZE. A volume takes any byte range (it merges partial blocks itself),
    so the minimum is 1; 4 KiB is the unit it writes without a read-modify-write."""

    minimum: int = 1
    preferred: int = 4096
    maximum: int = MAX_PAYLOAD


@dataclass(frozen=True)
class ClientFlags:
    fixed_newstyle: bool
    no_zeroes: bool


@dataclass(frozen=True)
class OptionHeader:
    option: int
    length: int


@dataclass(frozen=True)
class InfoRequest:
    """The data of NBD_OPT_INFO and NBD_OPT_GO."""

    name: str
    infos: tuple[int, ...]


@dataclass(frozen=True)
class MetaContextRequest:
    """The data of NBD_OPT_LIST_META_CONTEXT and NBD_OPT_SET_META_CONTEXT."""

    name: str
    queries: tuple[str, ...]


class Request(NamedTuple):
    """One request header. A tuple, not a frozen dataclass: one is made per request, and a
    frozen dataclass's __init__ (a setattr per field) was a visible share of a 4K read."""

    flags: int
    command: int
    handle: int
    offset: int
    length: int

    @property
    def payload_length(self) -> int:
        """Bytes of data that follow the header on the wire."""
        return self.length if self.command == CMD_WRITE else 0

    def describe(self) -> str:
        name = COMMAND_NAMES.get(self.command, f"command {self.command}")
        return f"{name} {self.offset}+{self.length} flags {self.flags:#x}"


@dataclass(frozen=True)
class ExportLimits:
    """What a request is checked against: the size advertised at the handshake."""

    size: int
    read_only: bool = False
    max_payload: int = MAX_PAYLOAD
    block_status: bool = False  # base:allocation was selected (so replies are structured)


# ---- handshake -------------------------------------------------------------------------

def greeting() -> bytes:
    """The server's first 18 bytes."""
    return _GREETING.pack(NBDMAGIC, IHAVEOPT, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)


def decode_client_flags(data: bytes) -> ClientFlags:
    _check_size(data, CLIENT_FLAGS_SIZE, "client flags")
    (flags,) = _CLIENT_FLAGS.unpack(data)
    if flags & ~KNOWN_CLIENT_FLAGS:
        # The spec: the server MUST drop the connection on a flag it does not know.
        raise ProtocolError(f"unknown client flags {flags:#x}")
    return ClientFlags(bool(flags & FLAG_C_FIXED_NEWSTYLE), bool(flags & FLAG_C_NO_ZEROES))


def decode_option_header(data: bytes) -> OptionHeader:
    _check_size(data, OPTION_HEADER_SIZE, "option header")
    magic, option, length = _OPTION_HEADER.unpack(data)
    if magic != IHAVEOPT:
        raise ProtocolError(f"bad option magic {magic:#x}")
    if length > MAX_OPTION_LENGTH:
        # Reading it to skip it would let a client make the server read gigabytes.
        raise ProtocolError(f"option {option} carries {length} bytes (at most "
                            f"{MAX_OPTION_LENGTH})")
    return OptionHeader(option, length)


def decode_export_name(data: bytes) -> str:
    """The data of NBD_OPT_EXPORT_NAME: the name itself."""
    return _decode_string(data, "export name")


def decode_info_request(data: bytes) -> InfoRequest:
    """The data of NBD_OPT_INFO / NBD_OPT_GO: u32 name length, name, u16 count, u16 each."""
    if len(data) < 6:
        raise OptionInvalid(f"info request of {len(data)} bytes (at least 6)")
    (name_length,) = struct.unpack_from(">I", data)
    if name_length > len(data) - 6:
        raise OptionInvalid(f"export name of {name_length} bytes in a request of {len(data)}")
    name = _decode_string(data[4 : 4 + name_length], "export name")
    (count,) = struct.unpack_from(">H", data, 4 + name_length)
    rest = data[6 + name_length :]
    if len(rest) != 2 * count:
        raise OptionInvalid(f"{count} information requests in {len(rest)} bytes")
    infos = struct.unpack(f">{count}H", rest)
    if len(set(infos)) != len(infos):
        raise OptionInvalid("an information request appears twice")
    return InfoRequest(name, infos)


def decode_meta_context_request(data: bytes) -> MetaContextRequest:
    """u32 name length, name, u32 query count, then per query u32 length and the query."""
    if len(data) < 8:
        raise OptionInvalid(f"meta context request of {len(data)} bytes (at least 8)")
    (name_length,) = struct.unpack_from(">I", data)
    if name_length > len(data) - 8:
        raise OptionInvalid(f"export name of {name_length} bytes in a request of {len(data)}")
    name = _decode_string(data[4 : 4 + name_length], "export name")
    position = 4 + name_length
    (count,) = struct.unpack_from(">I", data, position)
    position += 4
    if count > MAX_QUERIES:
        raise OptionInvalid(f"{count} queries (at most {MAX_QUERIES})")
    queries = []
    for _ in range(count):
        if len(data) - position < 4:
            raise OptionInvalid(f"{count} queries in {len(data)} bytes")
        (length,) = struct.unpack_from(">I", data, position)
        position += 4
        if length > len(data) - position:
            raise OptionInvalid(f"a query of {length} bytes in a request of {len(data)}")
        query = _decode_string(data[position : position + length], "query")
        position += length
        if ":" not in query:  # the spec: a query starts with a namespace
            raise OptionInvalid(f"query {query!r} names no namespace")
        queries.append(query)
    if position != len(data):
        raise OptionInvalid(f"{len(data) - position} bytes after the queries")
    return MetaContextRequest(name, tuple(queries))


def select_contexts(queries: tuple[str, ...], *, listing: bool) -> list[str]:
    """The contexts the queries select: `base:` is every base context, `base:allocation`
    itself; another namespace selects nothing. No query lists all (NBD_OPT_LIST_META_CONTEXT)
    and selects none (NBD_OPT_SET_META_CONTEXT)."""
    if not queries:
        return list(CONTEXTS) if listing else []
    return [context for context in CONTEXTS
            if any(query == context or query == "base:" for query in queries)]


def encode_meta_context(context_id: int, name: str) -> bytes:
    """The payload of one NBD_REP_META_CONTEXT."""
    return struct.pack(">I", context_id) + name.encode()


def encode_option_reply(option: int, reply: int, payload: bytes = b"") -> bytes:
    return _OPTION_REPLY.pack(OPTION_REPLY_MAGIC, option, reply, len(payload)) + payload


def encode_error_reply(option: int, reply: int, message: str) -> bytes:
    """An error reply; its data is a message for a human (cut to the spec's string limit)."""
    if not reply & REP_ERROR_BIT:
        raise ValueError(f"{reply:#x} is not an error reply")
    text = message.encode("utf-8", "replace")[:MAX_STRING]
    return encode_option_reply(option, reply, text)


def encode_server_entry(name: str) -> bytes:
    """The payload of one NBD_REP_SERVER (NBD_OPT_LIST)."""
    raw = name.encode()
    return struct.pack(">I", len(raw)) + raw


def encode_info_export(size: int, flags: int) -> bytes:
    return _INFO_EXPORT.pack(INFO_EXPORT, size, flags)


def encode_info_name(name: str) -> bytes:
    return struct.pack(">H", INFO_NAME) + name.encode()


def encode_info_block_size(sizes: BlockSizes) -> bytes:
    return _INFO_BLOCK_SIZE.pack(INFO_BLOCK_SIZE, sizes.minimum, sizes.preferred, sizes.maximum)


def encode_export_name_reply(size: int, flags: int, *, no_zeroes: bool) -> bytes:
    """The answer to NBD_OPT_EXPORT_NAME (it has no option reply header)."""
    return _EXPORT_NAME_REPLY.pack(size, flags) + (b"" if no_zeroes else bytes(124))


def transmission_flags(*, read_only: bool, multi_conn: bool) -> int:
    flags = (FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_FUA | FLAG_SEND_TRIM
             | FLAG_SEND_WRITE_ZEROES)
    if read_only:
        flags |= FLAG_READ_ONLY
    if multi_conn:
        flags |= FLAG_CAN_MULTI_CONN
    return flags


# ---- transmission ----------------------------------------------------------------------

def decode_request(data: bytes | bytearray | memoryview) -> Request:
    """A request header. Raises `ProtocolError` only where the stream is lost: a wrong magic,
    or a write whose payload is over the cap (it cannot be skipped without reading it)."""
    _check_size(data, REQUEST_HEADER_SIZE, "request header")
    magic, flags, command, handle, offset, length = _REQUEST.unpack(data)
    if magic != REQUEST_MAGIC:
        raise ProtocolError(f"bad request magic {magic:#x}")
    if command == CMD_WRITE and length > MAX_PAYLOAD:
        raise ProtocolError(f"write of {length} bytes (at most {MAX_PAYLOAD})")
    return Request(flags, command, handle, offset, length)


def request_error(request: Request, export: ExportLimits) -> int:
    """0 if the server should carry `request` out, else the NBD errno to answer with."""
    command, flags = request.command, request.flags
    if command == CMD_BLOCK_STATUS:
        return _block_status_error(request, export)
    if command not in SERVED_COMMANDS:
        return EINVAL  # unknown, or not advertised (CACHE)
    allowed = CMD_FLAG_FUA | (CMD_FLAG_NO_HOLE if command == CMD_WRITE_ZEROES else 0)
    if flags & ~allowed:
        return EINVAL  # DF, FAST_ZERO were not advertised; others are unknown
    if command == CMD_DISC:
        return 0
    if command == CMD_FLUSH:
        return EINVAL if request.offset or request.length else 0
    if export.read_only and command in WRITING_COMMANDS:
        return EPERM
    if command == CMD_READ and request.length > export.max_payload:
        return EINVAL
    if request.offset + request.length > export.size:
        # The spec's choice: writing past the end is "no space", reading or trimming there
        # is invalid.
        return ENOSPC if command in (CMD_WRITE, CMD_WRITE_ZEROES) else EINVAL
    return 0


def _block_status_error(request: Request, export: ExportLimits) -> int:
    if not export.block_status:
        return EINVAL  # the spec: no context selected, EINVAL
    if request.flags & ~(CMD_FLAG_FUA | CMD_FLAG_REQ_ONE):
        return EINVAL
    if not request.length or request.offset + request.length > export.size:
        return EINVAL
    return 0


def encode_simple_reply(error: int, handle: int) -> bytes:
    if error not in ERRORS and error != 0:
        raise ValueError(f"{error} is not an NBD error value")
    return _SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, handle)


def encode_offset_data_header(handle: int, offset: int, length: int, *, done: bool) -> bytes:
    """An NBD_REPLY_TYPE_OFFSET_DATA chunk up to its data (`length` bytes at `offset`, which
    follow it on the wire)."""
    if not 0 < length <= 2**32 - 9:
        raise ValueError(f"a data chunk of {length} bytes")
    return _OFFSET_DATA.pack(STRUCTURED_REPLY_MAGIC, _done(done), REPLY_TYPE_OFFSET_DATA,
                             handle, 8 + length, offset)


def encode_offset_hole(handle: int, offset: int, length: int, *, done: bool) -> bytes:
    """An NBD_REPLY_TYPE_OFFSET_HOLE chunk: `length` bytes at `offset` read as zeros."""
    if not 0 < length < 2**32:
        raise ValueError(f"a hole of {length} bytes")
    return _OFFSET_HOLE.pack(STRUCTURED_REPLY_MAGIC, _done(done), REPLY_TYPE_OFFSET_HOLE,
                             handle, 12, offset, length)


def encode_block_status(handle: int, context_id: int, extents: list[tuple[int, int]], *,
                        done: bool = True) -> bytes:
    """An NBD_REPLY_TYPE_BLOCK_STATUS chunk: (length, status flags) per extent, in order."""
    if not extents or any(not 0 < length < 2**32 for length, _ in extents):
        raise ValueError(f"block status extents {extents!r}")
    payload = struct.pack(">I", context_id) + b"".join(
        _EXTENT.pack(length, flags) for length, flags in extents)
    return _STRUCTURED_REPLY.pack(STRUCTURED_REPLY_MAGIC, _done(done),
                                  REPLY_TYPE_BLOCK_STATUS, handle, len(payload)) + payload


def encode_structured_error(handle: int, error: int, message: str = "", *,
                            offset: int | None = None, done: bool = True) -> bytes:
    """An NBD_REPLY_TYPE_ERROR chunk, or NBD_REPLY_TYPE_ERROR_OFFSET with `offset`."""
    if error not in ERRORS:
        raise ValueError(f"{error} is not an NBD error value")
    text = message.encode("utf-8", "replace")[:MAX_STRING]
    tail = b"" if offset is None else struct.pack(">Q", offset)
    kind = REPLY_TYPE_ERROR if offset is None else REPLY_TYPE_ERROR_OFFSET
    return _ERROR_CHUNK.pack(STRUCTURED_REPLY_MAGIC, _done(done), kind, handle,
                             6 + len(text) + len(tail), error, len(text)) + text + tail


def encode_structured_none(handle: int) -> bytes:
    """The final chunk that says only: done, and no error unless one came before."""
    return _STRUCTURED_REPLY.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE_NONE,
                                  handle, 0)


def _done(done: bool) -> int:
    return REPLY_FLAG_DONE if done else 0


def nbd_errno(os_errno: int) -> int:
    """The NBD error value for an OS errno: the protocol allows only a few."""
    if os_errno in (errno.EPERM, errno.EACCES, errno.EROFS):
        return EPERM
    if os_errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return ENOSPC
    if os_errno in (errno.EINVAL, errno.ERANGE):
        return EINVAL
    if os_errno == errno.ENOMEM:
        return ENOMEM
    if os_errno == errno.ESHUTDOWN:
        return ESHUTDOWN
    return EIO


# ---- the client's side (tests, the benchmark's pass-through) ---------------------------

def encode_option(option: int, data: bytes = b"") -> bytes:
    return _OPTION_HEADER.pack(IHAVEOPT, option, len(data)) + data


def encode_info_request(name: str, infos: tuple[int, ...] = ()) -> bytes:
    raw = name.encode()
    return (struct.pack(">I", len(raw)) + raw + struct.pack(">H", len(infos))
            + struct.pack(f">{len(infos)}H", *infos))


def encode_request(command: int, offset: int = 0, length: int = 0, *, handle: int = 0,
                   flags: int = 0) -> bytes:
    return _REQUEST.pack(REQUEST_MAGIC, flags, command, handle, offset, length)


def decode_option_reply_header(data: bytes) -> tuple[int, int, int]:
    """(option, reply type, payload length) of an option reply."""
    _check_size(data, OPTION_REPLY_HEADER_SIZE, "option reply header")
    magic, option, reply, length = _OPTION_REPLY.unpack(data)
    if magic != OPTION_REPLY_MAGIC:
        raise ProtocolError(f"bad option reply magic {magic:#x}")
    return option, reply, length


def decode_simple_reply(data: bytes) -> tuple[int, int]:
    """(error, handle) of a simple reply."""
    _check_size(data, SIMPLE_REPLY_SIZE, "simple reply")
    magic, error, handle = _SIMPLE_REPLY.unpack(data)
    if magic != SIMPLE_REPLY_MAGIC:
        raise ProtocolError(f"bad reply magic {magic:#x}")
    return error, handle


def decode_structured_reply_header(data: bytes) -> tuple[int, int, int, int]:
    """(flags, type, handle, payload length) of a structured reply chunk."""
    _check_size(data, STRUCTURED_REPLY_HEADER_SIZE, "structured reply header")
    magic, flags, kind, handle, length = _STRUCTURED_REPLY.unpack(data)
    if magic != STRUCTURED_REPLY_MAGIC:
        raise ProtocolError(f"bad structured reply magic {magic:#x}")
    return flags, kind, handle, length


# ---- helpers ---------------------------------------------------------------------------

def _check_size(data: bytes | bytearray | memoryview, size: int, what: str) -> None:
    if len(data) != size:
        raise ProtocolError(f"{what} of {len(data)} bytes, not {size}")


def _decode_string(data: bytes, what: str) -> str:
    if len(data) > MAX_STRING:
        raise OptionInvalid(f"{what} of {len(data)} bytes (at most {MAX_STRING})")
    try:
        text = bytes(data).decode("utf-8")
    except UnicodeDecodeError:
        raise OptionInvalid(f"{what} is not UTF-8") from None
    if "\0" in text:
        raise OptionInvalid(f"{what} contains NUL")
    return text
