"""Structured replies and NBD_CMD_BLOCK_STATUS (blockspace/service/nbd.py): negotiated only when
a client asks, a thin volume's unmapped slabs sent as holes and reported by base:allocation,
errors as error chunks. The raw client of test_nbd_server.py for the bytes, and libnbd's
nbdinfo / nbdcopy and qemu-img (which ask for structured replies by default) for the rest."""

import json
import os
import struct
from pathlib import Path
from typing import Any

import trio

from blockspace.errors import DeviceError
from blockspace.service import nbd_protocol as wire
from blockspace.service.iostats import IoStats
from blockspace.volume.volume import Volume
from tests.engine.test_nbd_server import (
    PARITY,
    VOLUME_SIZE,
    MiB,
    RawClient,
    exported,
    need,
    pattern,
    run,
)

Chunk = tuple[int, int, int, bytes]  # flags, type, handle, payload


async def structured_go(client: RawClient, *, contexts: tuple[str, ...] = (),
                        name: str = "vol") -> list[tuple[int, bytes]]:
    """Negotiate structured replies (and SET_META_CONTEXT with `contexts`), then GO; the
    replies to the SET."""
    await client.negotiate()
    assert await client.option(wire.OPT_STRUCTURED_REPLY) == [(wire.REP_ACK, b"")]
    replies: list[tuple[int, bytes]] = []
    if contexts:
        replies = await client.option(wire.OPT_SET_META_CONTEXT,
                                      meta_request(name, contexts))
    go = await client.option(wire.OPT_GO, wire.encode_info_request(name))
    assert go[-1][0] == wire.REP_ACK, go
    return replies


def meta_request(name: str, queries: tuple[str, ...]) -> bytes:
    raw = name.encode()
    return (struct.pack(">I", len(raw)) + raw + struct.pack(">I", len(queries))
            + b"".join(struct.pack(">I", len(q.encode())) + q.encode() for q in queries))


async def chunks(client: RawClient) -> list[Chunk]:
    """Every chunk of one structured reply, up to the one marked done."""
    out: list[Chunk] = []
    while True:
        flags, kind, handle, length = wire.decode_structured_reply_header(
            await client.receive(wire.STRUCTURED_REPLY_HEADER_SIZE))
        out.append((flags, kind, handle, await client.receive(length)))
        if flags & wire.REPLY_FLAG_DONE:
            return out


def reassemble(offset: int, length: int, reply: list[Chunk]) -> bytes:
    """The bytes a read's content chunks describe; each byte described exactly once."""
    out = bytearray(length)
    covered = bytearray(length)
    for _, kind, _, payload in reply:
        (start,) = struct.unpack_from(">Q", payload)
        if kind == wire.REPLY_TYPE_OFFSET_DATA:
            data = payload[8:]
            count = len(data)
        else:
            assert kind == wire.REPLY_TYPE_OFFSET_HOLE, kind
            (count,) = struct.unpack_from(">I", payload, 8)
            data = bytes(count)
        position = start - offset
        assert 0 <= position
        assert position + count <= length
        assert not any(covered[position : position + count]), "chunks overlap"
        out[position : position + count] = data
        covered[position : position + count] = b"\x01" * count
    assert all(covered), "the chunks leave part of the read out"
    return bytes(out)


def error_chunk(payload: bytes) -> tuple[int, str]:
    error, length = struct.unpack_from(">IH", payload)
    return error, payload[6 : 6 + length].decode()


def extents(payload: bytes) -> tuple[int, list[tuple[int, int]]]:
    (context,) = struct.unpack_from(">I", payload)
    pairs = [struct.unpack_from(">II", payload, at) for at in range(4, len(payload), 8)]
    return context, [(length, flags) for length, flags in pairs]


HOLE = wire.STATE_HOLE | wire.STATE_ZERO


def test_without_asking_a_client_gets_simple_replies(tmp_path: Path) -> None:
    async def main() -> None:
        async with exported(tmp_path) as env:
            client = await RawClient.go(env.socket)
            assert await client.call(wire.CMD_READ, 0, 4096) == (0, bytes(4096))
            # BLOCK_STATUS was not negotiated: a simple EINVAL, the connection goes on.
            assert await client.call(wire.CMD_BLOCK_STATUS, 0, 4096) == (wire.EINVAL, b"")
            assert await client.call(wire.CMD_READ, 0, 4096) == (0, bytes(4096))
            client.close()

    trio.run(main)


def test_a_read_sends_unmapped_slabs_as_holes(tmp_path: Path) -> None:
    async def main() -> None:
        async with exported(tmp_path) as env:
            volume = env.volumes["vol"]
            slab = volume.slab_data_size
            await volume.write(slab, pattern(5, slab))  # slab 1 only
            client = await RawClient.connect(env.socket)
            await structured_go(client)
            await client.request(wire.CMD_READ, 4096, 3 * slab - 8192, handle=7)
            reply = await chunks(client)
            assert [(kind, handle) for _, kind, handle, _ in reply] == [
                (wire.REPLY_TYPE_OFFSET_HOLE, 7), (wire.REPLY_TYPE_OFFSET_DATA, 7),
                (wire.REPLY_TYPE_OFFSET_HOLE, 7)]
            assert [flags for flags, _, _, _ in reply] == [0, 0, wire.REPLY_FLAG_DONE]
            expected = bytes(slab - 4096) + pattern(5, slab) + bytes(slab - 4096)
            assert reassemble(4096, 3 * slab - 8192, reply) == expected
            # All mapped: one data chunk, marked done.
            await client.request(wire.CMD_READ, slab + 100, 5000, handle=8)
            [(flags, kind, handle, payload)] = await chunks(client)
            assert (flags, kind, handle) == (wire.REPLY_FLAG_DONE, wire.REPLY_TYPE_OFFSET_DATA, 8)
            assert payload == struct.pack(">Q", slab + 100) + pattern(5, slab)[100:5100]
            # A read of nothing: only the final NONE chunk.
            await client.request(wire.CMD_READ, 0, 0, handle=9)
            assert await chunks(client) == [(wire.REPLY_FLAG_DONE, wire.REPLY_TYPE_NONE, 9, b"")]
            # Writes and flushes keep their simple replies (the spec allows it).
            assert await client.call(wire.CMD_WRITE, 0, 4096, payload=b"w" * 4096) == (0, b"")
            assert await client.call(wire.CMD_FLUSH) == (0, b"")
            await client.request(wire.CMD_READ, 0, 4096, handle=10)
            assert reassemble(0, 4096, await chunks(client)) == b"w" * 4096
            assert env.server.statistics().errors == 0
            client.close()

    trio.run(main)


def test_a_refused_or_failed_read_is_an_error_chunk(tmp_path: Path) -> None:
    class Failing:
        """A volume whose reads at 1 MiB fail (and, wrapped, cannot tell its holes)."""

        def __init__(self, volume: Volume) -> None:
            self.inner = volume
            self.name, self.size = volume.name, volume.size

        async def read(self, offset: int, length: int) -> bytes | bytearray:
            if offset == MiB:
                raise DeviceError("the disk under it is gone")
            return await self.inner.read(offset, length)

        async def write(self, offset: int, data: Any) -> None:
            await self.inner.write(offset, data)

        async def flush(self) -> None:
            await self.inner.flush()

    async def main() -> None:
        async with exported(tmp_path, wrap=Failing) as env:
            client = await RawClient.connect(env.socket)
            await structured_go(client)
            # Past the end: refused before any I/O, an ERROR chunk (never a simple reply).
            await client.request(wire.CMD_READ, VOLUME_SIZE - 512, 4096, handle=3)
            [(flags, kind, handle, payload)] = await chunks(client)
            assert (flags, kind, handle) == (wire.REPLY_FLAG_DONE, wire.REPLY_TYPE_ERROR, 3)
            error, message = error_chunk(payload)
            assert error == wire.EINVAL
            assert "READ" in message
            # A failed read: ERROR_OFFSET at where it failed, no content chunk.
            await client.request(wire.CMD_READ, MiB, 4096, handle=4)
            [(flags, kind, handle, payload)] = await chunks(client)
            assert (flags, kind, handle) == (wire.REPLY_FLAG_DONE,
                                             wire.REPLY_TYPE_ERROR_OFFSET, 4)
            assert error_chunk(payload)[0] == wire.EIO
            assert struct.unpack(">Q", payload[-8:]) == (MiB,)
            # A volume that cannot tell its holes is all data; the connection goes on.
            await client.request(wire.CMD_READ, 0, 8192, handle=5)
            [(flags, kind, _, payload)] = await chunks(client)
            assert (flags, kind) == (wire.REPLY_FLAG_DONE, wire.REPLY_TYPE_OFFSET_DATA)
            assert payload == struct.pack(">Q", 0) + bytes(8192)
            assert env.server.statistics().errors == 2
            client.close()

    trio.run(main)


def test_block_status_reports_the_holes_of_a_thin_volume(tmp_path: Path) -> None:
    async def main() -> None:
        async with exported(tmp_path) as env:
            volume = env.volumes["vol"]
            slab = volume.slab_data_size
            await volume.write(2 * slab + 10, b"x" * 10)  # slab 2
            await volume.write(3 * slab, b"y" * 10)  # slab 3
            client = await RawClient.connect(env.socket)
            replies = await structured_go(client, contexts=("base:allocation",))
            assert replies == [(wire.REP_META_CONTEXT, wire.encode_meta_context(
                wire.BASE_ALLOCATION_ID, "base:allocation")), (wire.REP_ACK, b"")]
            await client.request(wire.CMD_BLOCK_STATUS, 0, VOLUME_SIZE, handle=11)
            [(flags, kind, handle, payload)] = await chunks(client)
            assert (flags, kind, handle) == (wire.REPLY_FLAG_DONE,
                                             wire.REPLY_TYPE_BLOCK_STATUS, 11)
            assert extents(payload) == (wire.BASE_ALLOCATION_ID, [
                (2 * slab, HOLE), (2 * slab, 0), (VOLUME_SIZE - 4 * slab, HOLE)])
            # From the middle of a slab, and REQ_ONE: one extent, within the request.
            await client.request(wire.CMD_BLOCK_STATUS, 2 * slab + 4096, 3 * slab,
                                 handle=12, flags=wire.CMD_FLAG_REQ_ONE)
            [(_, kind, _, payload)] = await chunks(client)
            assert extents(payload) == (wire.BASE_ALLOCATION_ID, [(2 * slab - 4096, 0)])
            # Discarded whole, slab 3 is a hole again.
            assert await client.call(wire.CMD_TRIM, 3 * slab, slab) == (0, b"")
            await client.request(wire.CMD_BLOCK_STATUS, slab, 3 * slab, handle=13)
            [(_, _, _, payload)] = await chunks(client)
            assert extents(payload)[1] == [(slab, HOLE), (slab, 0), (slab, HOLE)]
            # Refused: nothing asked for, past the end, a flag it does not take.
            for offset, length, flags in ((0, 0, 0), (VOLUME_SIZE - 1, 2, 0),
                                          (0, 4096, wire.CMD_FLAG_DF)):
                await client.request(wire.CMD_BLOCK_STATUS, offset, length, handle=14,
                                     flags=flags)
                [(_, kind, _, payload)] = await chunks(client)
                assert kind == wire.REPLY_TYPE_ERROR
                assert error_chunk(payload)[0] == wire.EINVAL
            client.close()

    trio.run(main)


def test_block_status_needs_the_context_selected_for_that_export(tmp_path: Path) -> None:
    volumes = (("vol", VOLUME_SIZE, PARITY), ("other", 4 * MiB, PARITY))

    async def main() -> None:
        async with exported(tmp_path, volumes=volumes) as env:
            # Structured, but no context: BLOCK_STATUS is EINVAL.
            client = await RawClient.connect(env.socket)
            await structured_go(client)
            await client.request(wire.CMD_BLOCK_STATUS, 0, 4096, handle=1)
            [(_, kind, _, payload)] = await chunks(client)
            assert (kind, error_chunk(payload)[0]) == (wire.REPLY_TYPE_ERROR, wire.EINVAL)
            client.close()
            # Selected for "other", then GO to "vol": not selected for this one.
            client = await RawClient.connect(env.socket)
            await client.negotiate()
            await client.option(wire.OPT_STRUCTURED_REPLY)
            await client.option(wire.OPT_SET_META_CONTEXT,
                                meta_request("other", ("base:allocation",)))
            assert (await client.option(wire.OPT_GO,
                                        wire.encode_info_request("vol")))[-1][0] == wire.REP_ACK
            await client.request(wire.CMD_BLOCK_STATUS, 0, 4096, handle=2)
            [(_, kind, _, payload)] = await chunks(client)
            assert (kind, error_chunk(payload)[0]) == (wire.REPLY_TYPE_ERROR, wire.EINVAL)
            client.close()

    trio.run(main)


def test_meta_context_options(tmp_path: Path) -> None:
    async def main() -> None:
        async with exported(tmp_path) as env:
            client = await RawClient.connect(env.socket)
            await client.negotiate()
            query = meta_request("vol", ("base:allocation",))
            # Before structured replies: invalid (the spec's SHOULD).
            for option in (wire.OPT_LIST_META_CONTEXT, wire.OPT_SET_META_CONTEXT):
                [(reply, message)] = await client.option(option, query)
                assert reply == wire.REP_ERR_INVALID
                assert b"structured" in message
            [(reply, _)] = await client.option(wire.OPT_STRUCTURED_REPLY, b"x")
            assert reply == wire.REP_ERR_INVALID
            assert await client.option(wire.OPT_STRUCTURED_REPLY) == [(wire.REP_ACK, b"")]
            # LIST with no query: every context, id 0.
            assert await client.option(wire.OPT_LIST_META_CONTEXT, meta_request("vol", ())) == [
                (wire.REP_META_CONTEXT, wire.encode_meta_context(0, "base:allocation")),
                (wire.REP_ACK, b"")]
            # "base:" selects base:allocation; another namespace nothing.
            assert await client.option(wire.OPT_SET_META_CONTEXT, meta_request(
                "vol", ("base:",))) == [(wire.REP_META_CONTEXT, wire.encode_meta_context(
                    wire.BASE_ALLOCATION_ID, "base:allocation")), (wire.REP_ACK, b"")]
            assert await client.option(wire.OPT_SET_META_CONTEXT, meta_request(
                "vol", ("qemu:dirty-bitmap:x",))) == [(wire.REP_ACK, b"")]
            for data in (meta_request("vol", ("nonamespace",)), b"\x00\x00\x00\x03vo",
                         meta_request("vol", ()) + b"tail"):
                [(reply, _)] = await client.option(wire.OPT_SET_META_CONTEXT, data)
                assert reply == wire.REP_ERR_INVALID
            [(reply, message)] = await client.option(wire.OPT_SET_META_CONTEXT,
                                                     meta_request("nosuch", ("base:",)))
            assert reply == wire.REP_ERR_UNKNOWN
            # The last SET selected nothing (it failed): BLOCK_STATUS is refused after GO.
            assert (await client.option(wire.OPT_GO,
                                        wire.encode_info_request("vol")))[-1][0] == wire.REP_ACK
            await client.request(wire.CMD_BLOCK_STATUS, 0, 4096, handle=1)
            [(_, kind, _, _)] = await chunks(client)
            assert kind == wire.REPLY_TYPE_ERROR
            client.close()

    trio.run(main)


# ---- real clients ----------------------------------------------------------------------

def test_nbdinfo_map_shows_the_holes(tmp_path: Path) -> None:
    nbdinfo = need("nbdinfo")

    async def main() -> None:
        async with exported(tmp_path) as env:
            volume = env.volumes["vol"]
            slab = volume.slab_data_size
            await volume.write(slab, pattern(1, 4096))
            mapped = json.loads(await run(nbdinfo, "--map", "--json", env.uri()))
            assert [(e["offset"], e["length"], e["type"]) for e in mapped] == [
                (0, slab, HOLE), (slab, slab, 0), (2 * slab, VOLUME_SIZE - 2 * slab, HOLE)]
            info = json.loads(await run(nbdinfo, "--json", env.uri()))
            assert info["protocol"] == "newstyle-fixed"
            export = info["exports"][0]
            assert export["contexts"] == ["base:allocation"]

    trio.run(main)


def test_qemu_img_map_shows_data_and_zeros(tmp_path: Path) -> None:
    qemu_img = need("qemu-img")

    async def main() -> None:
        async with exported(tmp_path) as env:
            volume = env.volumes["vol"]
            slab = volume.slab_data_size
            await volume.write(3 * slab, pattern(2, 8192))
            listing = json.loads(await run(qemu_img, "map", "--output=json", "-f", "raw",
                                           env.uri()))
            data = [(e["start"], e["length"]) for e in listing if e["data"]]
            assert data == [(3 * slab, slab)]
            assert all(e["zero"] for e in listing if not e["data"])
            assert sum(e["length"] for e in listing) == VOLUME_SIZE

    trio.run(main)


def test_nbdcopy_of_a_sparse_volume_makes_a_sparse_file(tmp_path: Path) -> None:
    """nbdcopy asks base:allocation and reads with structured replies: the copy has the
    data, and the holes stay holes (the copy's file allocates about the data only)."""
    nbdcopy = need("nbdcopy")
    copy = tmp_path / "copy.raw"
    data = os.urandom(MiB)

    async def main() -> None:
        async with exported(tmp_path) as env:
            volume = env.volumes["vol"]
            await volume.write(5 * MiB, data)
            await run(nbdcopy, env.uri(), str(copy))
            assert env.server.statistics().errors == 0
            # Only the mapped slab was read from the volume.
            assert env.server.statistics().bytes_read <= 2 * volume.slab_data_size

    trio.run(main)
    copied = copy.read_bytes()
    assert copied[5 * MiB : 6 * MiB] == data
    assert copied.count(0) >= VOLUME_SIZE - MiB
    assert os.stat(copy).st_blocks * 512 <= 4 * MiB


def test_a_structured_read_counts_once_with_its_holes(tmp_path: Path) -> None:
    """iostat sees a read as the client does: one operation of its full length, whether its
    slabs were read or sent as holes."""
    io = IoStats()
    lengths: list[int] = []

    async def main() -> None:
        async with exported(tmp_path, io=io) as env:
            slab = env.volumes["vol"].slab_data_size
            await env.volumes["vol"].write(slab, b"d" * 4096)
            client = await RawClient.connect(env.socket)
            await structured_go(client)
            for handle, (offset, length) in enumerate(((0, 3 * slab), (0, 4096),
                                                       (slab, 4096))):
                await client.request(wire.CMD_READ, offset, length, handle=handle)
                await chunks(client)
                lengths.append(length)
            assert env.server.statistics().bytes_read == sum(lengths)
            client.close()

    trio.run(main)
    counters = io.volumes["vol"]
    assert (counters.read.ops, counters.read.bytes, counters.read.errors) == (
        3, sum(lengths), 0)
