"""NBD requests count in the daemon's per-volume counters (iostat, metrics) as the FUSE
files' do: reads, writes (with TRIM and WRITE_ZEROES), flushes, bytes and errors."""

from pathlib import Path

import trio

from blockspace.service import nbd_protocol as wire
from blockspace.service.iostats import IoStats

from .test_nbd_server import VOLUME_SIZE, RawClient, exported


def test_nbd_requests_are_counted_per_volume(tmp_path: Path) -> None:
    io = IoStats()

    async def main() -> None:
        async with exported(tmp_path, io=io) as env:
            client = await RawClient.go(env.socket)
            data = b"\x5a" * 65536
            assert (await client.call(wire.CMD_WRITE, 0, len(data), payload=data))[0] == 0
            assert await client.call(wire.CMD_READ, 0, 4096) == (0, data[:4096])
            assert (await client.call(wire.CMD_WRITE_ZEROES, 65536, 8192))[0] == 0
            assert (await client.call(wire.CMD_FLUSH))[0] == 0
            error, _ = await client.call(wire.CMD_READ, VOLUME_SIZE - 4096, 8192)  # past end
            assert error != 0

    trio.run(main)
    counters = io.volumes["vol"]
    assert (counters.write.ops, counters.write.bytes) == (2, 65536 + 8192)
    assert (counters.read.ops, counters.read.bytes) == (1, 4096)
    assert counters.flush.ops == 1
    assert counters.write.seconds > 0
    assert sum(counters.read.buckets) == counters.read.ops
