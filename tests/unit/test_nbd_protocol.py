"""The NBD codec (blockspace/service/nbd_protocol.py): the bytes the spec fixes, round trips,
every check of a request's fields, and garbage into every decoder raising only the codec's
own errors."""

import errno
import struct
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blockspace.service import nbd_protocol as wire

MiB = 1 << 20
EXPORT = wire.ExportLimits(size=64 * MiB)
READ_ONLY = wire.ExportLimits(size=64 * MiB, read_only=True)
STATUS = wire.ExportLimits(size=64 * MiB, block_status=True)
STATUS_READ_ONLY = wire.ExportLimits(size=64 * MiB, read_only=True, block_status=True)


# ---- handshake -------------------------------------------------------------------------

def test_greeting_is_the_fixed_newstyle_opening() -> None:
    assert wire.greeting() == b"NBDMAGIC" + b"IHAVEOPT" + b"\x00\x03"


@pytest.mark.parametrize(("flags", "fixed", "no_zeroes"), [
    (0, False, False), (1, True, False), (2, False, True), (3, True, True),
])
def test_client_flags(flags: int, fixed: bool, no_zeroes: bool) -> None:
    decoded = wire.decode_client_flags(struct.pack(">I", flags))
    assert (decoded.fixed_newstyle, decoded.no_zeroes) == (fixed, no_zeroes)


@pytest.mark.parametrize("flags", [4, 1 << 31, 0xFFFFFFFF])
def test_unknown_client_flags_drop_the_connection(flags: int) -> None:
    with pytest.raises(wire.ProtocolError, match="unknown client flags"):
        wire.decode_client_flags(struct.pack(">I", flags))


def test_option_header_round_trip() -> None:
    header = wire.decode_option_header(wire.encode_option(wire.OPT_GO, b"x" * 10)[:16])
    assert header == wire.OptionHeader(wire.OPT_GO, 10)


def test_option_header_with_a_bad_magic_is_a_protocol_error() -> None:
    data = struct.pack(">QII", wire.NBDMAGIC, wire.OPT_LIST, 0)
    with pytest.raises(wire.ProtocolError, match="bad option magic"):
        wire.decode_option_header(data)


def test_an_option_too_long_to_read_is_a_protocol_error() -> None:
    data = struct.pack(">QII", wire.IHAVEOPT, 99, wire.MAX_OPTION_LENGTH + 1)
    with pytest.raises(wire.ProtocolError, match="carries"):
        wire.decode_option_header(data)
    longest = struct.pack(">QII", wire.IHAVEOPT, 99, wire.MAX_OPTION_LENGTH)
    assert wire.decode_option_header(longest).length == wire.MAX_OPTION_LENGTH


names = st.text(st.characters(blacklist_characters="\0", blacklist_categories=["Cs"]),
                max_size=100)


@given(name=names, infos=st.lists(st.integers(0, 0xFFFF), unique=True, max_size=20))
def test_info_request_round_trip(name: str, infos: list[int]) -> None:
    request = wire.decode_info_request(wire.encode_info_request(name, tuple(infos)))
    assert request == wire.InfoRequest(name, tuple(infos))


@pytest.mark.parametrize(("data", "match"), [
    (b"", "at least 6"),
    (b"\x00\x00\x00\x05ab\x00\x00", "export name of 5 bytes"),
    (b"\x00\x00\x00\x00\x00\x02\x00\x03", "2 information requests in 2 bytes"),
    (b"\x00\x00\x00\x00\x00\x00\x00", "0 information requests in 1 bytes"),
    (b"\x00\x00\x00\x00\x00\x02\x00\x03\x00\x03", "appears twice"),
    (b"\x00\x00\x00\x02\xff\xfe\x00\x00", "not UTF-8"),
    (b"\x00\x00\x00\x02a\x00\x00\x00", "contains NUL"),
])
def test_malformed_info_requests_are_invalid_options(data: bytes, match: str) -> None:
    with pytest.raises(wire.OptionInvalid, match=match):
        wire.decode_info_request(data)


def test_export_names() -> None:
    assert wire.decode_export_name("völ".encode()) == "völ"
    assert wire.decode_export_name(b"") == ""  # the default export
    assert wire.decode_export_name(b"n" * wire.MAX_STRING) == "n" * wire.MAX_STRING
    with pytest.raises(wire.OptionInvalid, match="at most 4096"):
        wire.decode_export_name(b"n" * (wire.MAX_STRING + 1))


def test_option_replies() -> None:
    assert wire.encode_option_reply(wire.OPT_LIST, wire.REP_ACK) == (
        bytes.fromhex("0003e889045565a9") + b"\x00\x00\x00\x03" + b"\x00\x00\x00\x01"
        + b"\x00\x00\x00\x00")
    reply = wire.encode_error_reply(7, wire.REP_ERR_UNKNOWN, "no volume 'x'")
    assert wire.decode_option_reply_header(reply[:20]) == (7, wire.REP_ERR_UNKNOWN, 13)
    assert reply[20:] == b"no volume 'x'"
    long_reply = wire.encode_error_reply(7, wire.REP_ERR_UNKNOWN, "x" * 10000)
    assert len(long_reply) == 20 + wire.MAX_STRING
    with pytest.raises(ValueError, match="not an error reply"):
        wire.encode_error_reply(7, wire.REP_ACK, "fine")


def test_info_payloads_have_the_lengths_the_spec_fixes() -> None:
    assert wire.encode_info_export(MiB, 0x1234) == struct.pack(">HQH", 0, MiB, 0x1234)
    assert len(wire.encode_info_export(MiB, 1)) == 12
    block = wire.encode_info_block_size(wire.BlockSizes())
    assert block == struct.pack(">HIII", 3, 1, 4096, 32 * MiB)
    assert len(block) == 14
    assert wire.encode_info_name("vol") == b"\x00\x01vol"
    assert wire.encode_server_entry("vol") == b"\x00\x00\x00\x03vol"


def test_export_name_reply_with_and_without_zeroes() -> None:
    full = wire.encode_export_name_reply(MiB, 0x1F, no_zeroes=False)
    assert full[:10] == struct.pack(">QH", MiB, 0x1F)
    assert full[10:] == bytes(124)
    assert wire.encode_export_name_reply(MiB, 0x1F, no_zeroes=True) == full[:10]


def test_transmission_flags_advertise_what_the_server_does_and_nothing_else() -> None:
    flags = wire.transmission_flags(read_only=False, multi_conn=True)
    for flag in (wire.FLAG_HAS_FLAGS, wire.FLAG_SEND_FLUSH, wire.FLAG_SEND_FUA,
                 wire.FLAG_SEND_TRIM, wire.FLAG_SEND_WRITE_ZEROES, wire.FLAG_CAN_MULTI_CONN):
        assert flags & flag
    for flag in (wire.FLAG_READ_ONLY, wire.FLAG_SEND_DF, wire.FLAG_SEND_CACHE,
                 wire.FLAG_SEND_FAST_ZERO, wire.FLAG_SEND_RESIZE, wire.FLAG_ROTATIONAL):
        assert not flags & flag
    assert wire.transmission_flags(read_only=True, multi_conn=False) & wire.FLAG_READ_ONLY
    assert not wire.transmission_flags(read_only=True, multi_conn=False) & wire.FLAG_CAN_MULTI_CONN


# ---- transmission ----------------------------------------------------------------------

@given(flags=st.integers(0, 0xFFFF), command=st.integers(0, 0xFFFF),
       handle=st.integers(0, 2**64 - 1), offset=st.integers(0, 2**64 - 1),
       length=st.integers(0, 2**32 - 1))
def test_request_round_trip(flags: int, command: int, handle: int, offset: int,
                            length: int) -> None:
    data = wire.encode_request(command, offset, length, handle=handle, flags=flags)
    if command == wire.CMD_WRITE and length > wire.MAX_PAYLOAD:
        with pytest.raises(wire.ProtocolError, match="write of"):
            wire.decode_request(data)
        return
    request = wire.decode_request(data)
    assert request == wire.Request(flags, command, handle, offset, length)
    assert request.payload_length == (length if command == wire.CMD_WRITE else 0)


def test_request_with_a_bad_magic_is_a_protocol_error() -> None:
    data = bytearray(wire.encode_request(wire.CMD_READ, 0, 512))
    data[0] ^= 1
    with pytest.raises(wire.ProtocolError, match="bad request magic"):
        wire.decode_request(bytes(data))


def test_the_largest_write_decodes_and_one_byte_more_does_not() -> None:
    assert wire.decode_request(wire.encode_request(wire.CMD_WRITE, 0, wire.MAX_PAYLOAD))
    with pytest.raises(wire.ProtocolError):
        wire.decode_request(wire.encode_request(wire.CMD_WRITE, 0, wire.MAX_PAYLOAD + 1))
    # A read that large is framed (no payload follows): it is answered EINVAL instead.
    big_read = wire.decode_request(wire.encode_request(wire.CMD_READ, 0, wire.MAX_PAYLOAD + 1))
    assert wire.request_error(big_read, EXPORT) == wire.EINVAL


def request(command: int, offset: int = 0, length: int = 0, flags: int = 0) -> wire.Request:
    return wire.Request(flags, command, 1, offset, length)


SIZE = EXPORT.size


@pytest.mark.parametrize(("req", "limits", "expected"), [
    (request(wire.CMD_READ, 0, 4096), EXPORT, 0),
    (request(wire.CMD_READ, SIZE - 4096, 4096), EXPORT, 0),
    (request(wire.CMD_READ, SIZE - 4096, 4097), EXPORT, wire.EINVAL),  # past the end
    (request(wire.CMD_READ, SIZE, 0), EXPORT, 0),
    (request(wire.CMD_READ, 2**64 - 1, 1), EXPORT, wire.EINVAL),  # no wrap-around
    (request(wire.CMD_READ, 0, wire.MAX_PAYLOAD), wire.ExportLimits(64 * MiB), 0),
    (request(wire.CMD_READ, 0, 2 * MiB), wire.ExportLimits(SIZE, max_payload=MiB), wire.EINVAL),
    (request(wire.CMD_READ, 0, 4096), READ_ONLY, 0),
    (request(wire.CMD_WRITE, 0, 4096), EXPORT, 0),
    (request(wire.CMD_WRITE, SIZE - 1, 2), EXPORT, wire.ENOSPC),
    (request(wire.CMD_WRITE, 0, 4096), READ_ONLY, wire.EPERM),
    (request(wire.CMD_WRITE, 0, 4096, wire.CMD_FLAG_FUA), EXPORT, 0),
    (request(wire.CMD_WRITE, 0, 4096, wire.CMD_FLAG_NO_HOLE), EXPORT, wire.EINVAL),
    (request(wire.CMD_READ, 0, 4096, wire.CMD_FLAG_DF), EXPORT, wire.EINVAL),  # not negotiated
    (request(wire.CMD_READ, 0, 4096, 1 << 15), EXPORT, wire.EINVAL),
    (request(wire.CMD_TRIM, 0, SIZE), EXPORT, 0),  # no payload: any length within the export
    (request(wire.CMD_TRIM, 4096, SIZE), EXPORT, wire.EINVAL),
    (request(wire.CMD_TRIM, 0, 4096), READ_ONLY, wire.EPERM),
    (request(wire.CMD_WRITE_ZEROES, 0, SIZE, wire.CMD_FLAG_NO_HOLE | wire.CMD_FLAG_FUA),
     EXPORT, 0),
    (request(wire.CMD_WRITE_ZEROES, SIZE, 1), EXPORT, wire.ENOSPC),
    (request(wire.CMD_WRITE_ZEROES, 0, 1), READ_ONLY, wire.EPERM),
    (request(wire.CMD_WRITE_ZEROES, 0, 1, wire.CMD_FLAG_FAST_ZERO), EXPORT, wire.EINVAL),
    (request(wire.CMD_FLUSH), EXPORT, 0),
    (request(wire.CMD_FLUSH, flags=wire.CMD_FLAG_FUA), EXPORT, 0),  # FUA is valid everywhere
    (request(wire.CMD_FLUSH, 0, 1), EXPORT, wire.EINVAL),
    (request(wire.CMD_FLUSH, 4096, 0), EXPORT, wire.EINVAL),
    (request(wire.CMD_FLUSH), READ_ONLY, 0),
    (request(wire.CMD_DISC), EXPORT, 0),
    (request(wire.CMD_CACHE, 0, 4096), EXPORT, wire.EINVAL),  # not advertised
    (request(wire.CMD_BLOCK_STATUS, 0, 4096), EXPORT, wire.EINVAL),  # no context selected
    (request(wire.CMD_BLOCK_STATUS, 0, 4096), STATUS, 0),
    (request(wire.CMD_BLOCK_STATUS, 0, SIZE, wire.CMD_FLAG_REQ_ONE), STATUS, 0),
    (request(wire.CMD_BLOCK_STATUS, 0, 4096, wire.CMD_FLAG_FUA), STATUS, 0),
    (request(wire.CMD_BLOCK_STATUS, 0, 4096), STATUS_READ_ONLY, 0),  # it writes nothing
    (request(wire.CMD_BLOCK_STATUS, 0, 0), STATUS, wire.EINVAL),
    (request(wire.CMD_BLOCK_STATUS, SIZE - 1, 2), STATUS, wire.EINVAL),
    (request(wire.CMD_BLOCK_STATUS, 0, 4096, wire.CMD_FLAG_DF), STATUS, wire.EINVAL),
    (request(wire.CMD_READ, 0, 4096, wire.CMD_FLAG_REQ_ONE), STATUS, wire.EINVAL),
    (request(9, 0, 0), EXPORT, wire.EINVAL),
    (request(0xFFFF, 0, 0), EXPORT, wire.EINVAL),
])
def test_request_checks(req: wire.Request, limits: wire.ExportLimits, expected: int) -> None:
    assert wire.request_error(req, limits) == expected


@given(flags=st.integers(0, 0xFFFF), command=st.integers(0, 0xFFFF),
       offset=st.integers(0, 2**64 - 1), length=st.integers(0, 2**32 - 1),
       size=st.integers(0, 2**50), read_only=st.booleans())
def test_an_accepted_request_is_one_the_volume_can_take(
    flags: int, command: int, offset: int, length: int, size: int, read_only: bool
) -> None:
    limits = wire.ExportLimits(size, read_only)
    req = wire.Request(flags, command, 0, offset, length)
    error = wire.request_error(req, limits)
    assert error == 0 or error in wire.ERRORS
    if error:
        return
    assert command in wire.SERVED_COMMANDS  # BLOCK_STATUS only with block_status
    assert not flags & ~(wire.CMD_FLAG_FUA | wire.CMD_FLAG_NO_HOLE)
    if command in (wire.CMD_READ, wire.CMD_WRITE, wire.CMD_TRIM, wire.CMD_WRITE_ZEROES):
        assert offset + length <= size
    if command == wire.CMD_READ:
        assert length <= wire.MAX_PAYLOAD
    if read_only:
        assert command not in wire.WRITING_COMMANDS


def test_simple_replies() -> None:
    reply = wire.encode_simple_reply(0, 0x0102030405060708)
    assert reply == bytes.fromhex("67446698" "00000000" "0102030405060708")
    assert wire.decode_simple_reply(wire.encode_simple_reply(wire.ENOSPC, 7)) == (wire.ENOSPC, 7)
    with pytest.raises(ValueError, match="not an NBD error"):
        wire.encode_simple_reply(errno.ENOENT, 7)
    with pytest.raises(wire.ProtocolError, match="bad reply magic"):
        wire.decode_simple_reply(bytes(16))


@pytest.mark.parametrize(("os_errno", "expected"), [
    (errno.EPERM, wire.EPERM), (errno.EACCES, wire.EPERM), (errno.EROFS, wire.EPERM),
    (errno.ENOSPC, wire.ENOSPC), (errno.EDQUOT, wire.ENOSPC), (errno.EFBIG, wire.ENOSPC),
    (errno.EINVAL, wire.EINVAL), (errno.ENOMEM, wire.ENOMEM), (errno.EIO, wire.EIO),
    (errno.ENOENT, wire.EIO), (errno.ETIMEDOUT, wire.EIO), (0, wire.EIO),
])
def test_os_errors_map_onto_the_few_nbd_allows(os_errno: int, expected: int) -> None:
    assert wire.nbd_errno(os_errno) == expected


@given(st.integers(-1000, 1000))
def test_every_os_errno_maps_to_an_nbd_error(os_errno: int) -> None:
    assert wire.nbd_errno(os_errno) in wire.ERRORS


# ---- garbage ---------------------------------------------------------------------------

DECODERS = [
    wire.decode_client_flags, wire.decode_option_header, wire.decode_export_name,
    wire.decode_info_request, wire.decode_request, wire.decode_option_reply_header,
    wire.decode_simple_reply, wire.decode_meta_context_request,
    wire.decode_structured_reply_header,
]


@pytest.mark.parametrize("decoder", DECODERS, ids=lambda d: d.__name__)
@given(data=st.binary(max_size=64))
def test_garbage_raises_only_the_codecs_errors(decoder: object, data: bytes) -> None:
    assert callable(decoder)
    try:
        decoder(data)
    except wire.NbdError:
        pass


@given(data=st.binary(min_size=28, max_size=28))
def test_any_framed_request_is_checked_without_raising(data: bytes) -> None:
    try:
        req = wire.decode_request(data)
    except wire.ProtocolError:
        return
    assert wire.request_error(req, EXPORT) in wire.ERRORS | {0}


@given(name=st.binary(max_size=40), count=st.integers(0, 0xFFFF), tail=st.binary(max_size=40),
       claimed=st.integers(0, 2**32 - 1))
def test_info_requests_with_lying_lengths(name: bytes, count: int, tail: bytes,
                                          claimed: int) -> None:
    data = struct.pack(">I", claimed) + name + struct.pack(">H", count) + tail
    try:
        decoded = wire.decode_info_request(data)
    except wire.OptionInvalid:
        return
    assert claimed == len(name)
    assert len(tail) == 2 * count
    assert len(decoded.infos) == count


# ---- structured replies and metadata contexts -------------------------------------------

def test_structured_chunks_are_the_bytes_the_spec_fixes() -> None:
    handle = 0x0102030405060708
    assert wire.encode_offset_data_header(handle, 4096, 512, done=True) == bytes.fromhex(
        "668e33ef" "0001" "0001" "0102030405060708" "00000208" "0000000000001000")
    assert wire.encode_offset_hole(handle, 0, MiB, done=False) == bytes.fromhex(
        "668e33ef" "0000" "0002" "0102030405060708" "0000000c" "0000000000000000" "00100000")
    assert wire.encode_structured_none(7) == bytes.fromhex(
        "668e33ef" "0001" "0000" "0000000000000007" "00000000")
    assert wire.encode_block_status(7, 1, [(MiB, 3), (4096, 0)]) == bytes.fromhex(
        "668e33ef" "0001" "0005" "0000000000000007" "00000014" "00000001"
        "00100000" "00000003" "00001000" "00000000")
    assert wire.encode_structured_error(7, wire.EIO, "bad") == bytes.fromhex(
        "668e33ef" "0001" "8001" "0000000000000007" "00000009" "00000005" "0003") + b"bad"
    assert wire.encode_structured_error(7, wire.EIO, "", offset=512) == bytes.fromhex(
        "668e33ef" "0001" "8002" "0000000000000007" "0000000e" "00000005" "0000"
        "0000000000000200")


def test_structured_reply_header_round_trip() -> None:
    chunk = wire.encode_offset_hole(9, 0, 4096, done=True)
    assert wire.decode_structured_reply_header(chunk[:20]) == (
        wire.REPLY_FLAG_DONE, wire.REPLY_TYPE_OFFSET_HOLE, 9, 12)
    with pytest.raises(wire.ProtocolError, match="bad structured reply magic"):
        wire.decode_structured_reply_header(wire.encode_simple_reply(0, 9) + bytes(4))


@pytest.mark.parametrize(("encode", "args"), [
    (wire.encode_offset_data_header, (0, 0)),
    (wire.encode_offset_data_header, (0, 2**32 - 8)),
    (wire.encode_offset_hole, (0, 0)),
    (wire.encode_offset_hole, (0, 2**32)),
])
def test_chunks_that_cannot_be_framed_are_refused(encode: Any, args: tuple[int, int]) -> None:
    with pytest.raises(ValueError, match="chunk|hole"):
        encode(1, *args, done=True)


def test_block_status_and_error_chunks_refuse_what_the_spec_forbids() -> None:
    with pytest.raises(ValueError, match="extents"):
        wire.encode_block_status(1, 1, [])
    with pytest.raises(ValueError, match="extents"):
        wire.encode_block_status(1, 1, [(0, 3)])
    with pytest.raises(ValueError, match="not an NBD error"):
        wire.encode_structured_error(1, 0)
    long = wire.encode_structured_error(1, wire.EIO, "x" * 10000)
    assert len(long) == 20 + 6 + wire.MAX_STRING


def meta(name: bytes, *queries: bytes) -> bytes:
    return (struct.pack(">I", len(name)) + name + struct.pack(">I", len(queries))
            + b"".join(struct.pack(">I", len(q)) + q for q in queries))


def test_meta_context_requests() -> None:
    assert wire.decode_meta_context_request(meta(b"vol")) == wire.MetaContextRequest("vol", ())
    assert wire.decode_meta_context_request(meta(b"", b"base:allocation", b"qemu:x")) == (
        wire.MetaContextRequest("", ("base:allocation", "qemu:x")))


@pytest.mark.parametrize("data", [
    b"", b"\x00" * 7, meta(b"vol")[:-1], meta(b"vol") + b"x", meta(b"vol", b"nocolon"),
    meta(b"vol", b"base:")[:-1], struct.pack(">I", 3) + b"vol" + struct.pack(">I", 2**31),
    meta(b"v\x00l", b"base:"), meta(b"vol", b"\xff:"),
    struct.pack(">I", 0) + struct.pack(">I", wire.MAX_QUERIES + 1)
    + meta(b"", *[b"a:"] * (wire.MAX_QUERIES + 1))[8:],
])
def test_malformed_meta_context_requests_are_invalid(data: bytes) -> None:
    with pytest.raises(wire.OptionInvalid):
        wire.decode_meta_context_request(data)


@pytest.mark.parametrize(("queries", "listing", "expected"), [
    ((), True, ["base:allocation"]),
    ((), False, []),
    (("base:",), False, ["base:allocation"]),
    (("base:allocation",), True, ["base:allocation"]),
    (("base:allocation", "base:"), False, ["base:allocation"]),  # once, not twice
    (("base:other", "qemu:dirty-bitmap:a", "x-y:z"), False, []),
])
def test_context_selection(queries: tuple[str, ...], listing: bool,
                           expected: list[str]) -> None:
    assert wire.select_contexts(queries, listing=listing) == expected


@given(name=st.binary(max_size=20), claimed=st.integers(0, 2**32 - 1),
       count=st.integers(0, 2**32 - 1), tail=st.binary(max_size=40))
def test_meta_context_requests_with_lying_lengths(name: bytes, claimed: int, count: int,
                                                  tail: bytes) -> None:
    data = struct.pack(">I", claimed) + name + struct.pack(">I", count) + tail
    try:
        decoded = wire.decode_meta_context_request(data)
    except wire.OptionInvalid:
        return
    assert claimed == len(name)
    assert len(decoded.queries) == count
