#!/usr/bin/env python3
"""The NBD server's own cost per request, without a volume under it: blockspace's NbdServer
(from whichever checkout PYTHONPATH names) over an in-memory export, fio's nbd engine as the
client, and the server process's CPU time (utime + stime) divided by the requests it answered.

For A/B of changes to blockspace/service/nbd*.py: run it with PYTHONPATH at each tree in turn,
several rounds, alternating, and compare the medians (the figures move with the machine's
load; the arms of one run share it). tools/bench --nbd measures the whole daemon instead.

    PYTHONPATH=TREE tools/nbd_hotpath.py randread 16 20000   # prints: us/request  requests/s
"""

import argparse
import resource
import tempfile
import time
from pathlib import Path

import trio

from blockspace.service.nbd import NbdServer, UnixAddress

SIZE = 256 << 20


class MemoryVolume:
    """What an export needs, over a bytearray; no await, so only the server's cost shows."""

    name = "vol"
    size = SIZE

    def __init__(self) -> None:
        self.data = bytearray(SIZE)

    async def read(self, offset: int, length: int) -> bytes | bytearray:
        return self.data[offset : offset + length]

    async def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self.data[offset : offset + len(data)] = data

    async def flush(self) -> None:
        pass


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)  # this process only, not fio
    return usage.ru_utime + usage.ru_stime


async def measure(job: str, depth: int, requests: int) -> tuple[float, float]:
    volume = MemoryVolume()
    server = NbdServer(lambda: {"vol": volume})
    with tempfile.TemporaryDirectory(prefix="nbd-hotpath-") as scratch:
        path = Path(scratch) / "nbd.sock"
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve, UnixAddress(path))
            command = ["fio", "--name=hotpath", "--ioengine=nbd",
                       f"--uri=nbd+unix:///vol?socket={path}", f"--rw={job}", "--bs=4k",
                       f"--iodepth={depth}", f"--number_ios={requests}", "--size=256m",
                       "--output-format=terse"]
            cpu, began = cpu_seconds(), time.perf_counter()
            await trio.run_process(command, capture_stdout=True, capture_stderr=True)
            cpu, wall = cpu_seconds() - cpu, time.perf_counter() - began
            answered = server.statistics().requests
            nursery.cancel_scope.cancel()
    return cpu / answered * 1e6, answered / wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("job", choices=["randread", "randwrite", "read", "write"])
    parser.add_argument("depth", type=int)
    parser.add_argument("requests", type=int)
    args = parser.parse_args()
    per_request, rate = trio.run(measure, args.job, args.depth, args.requests)
    print(f"{per_request:.1f} {rate:.0f}")


if __name__ == "__main__":
    main()
