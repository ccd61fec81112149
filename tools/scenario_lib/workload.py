"""The workload of a trial: files written with fsync, and the check of every acknowledged byte.

Content is a pure function of (seed, file name, offset), so nothing but the names and sizes of
the acknowledged files has to be remembered. Every 4 KiB block of a file starts with a 16-byte
tag of the file's name and the block's offset in the file, so a block read from the wrong
place, from another file, or from before it was written never passes for the right one.

Run as a program (`python -m scenario_lib.workload ...`) it is the writer process of a trial,
or the checker (in a process of its own, so a read stuck in the kernel cannot hang the run):

    write  --dir D --log L --seed S --prefix P --min-size A --max-size B --stop-file F
           [--max-bytes N] [--rate BYTES_PER_SECOND]
        Writes D/P/000000.bin, 000001.bin, ...: each file is created, written, fsynced,
        closed, and its directory fsynced; only then is a line {"ev": "ack", ...} appended
        to L. A failed step appends {"ev": "err", ...} instead (the file is not acknowledged)
        and the writer goes on with the next file, so writes continue during a fault.
    check  --plan PLAN.json --out RESULT.json --seed S
        Reads every file of the plan (through the file system, or straight from the block
        device at the extents the plan gives) with O_DIRECT and compares every byte.
    scan   --device DEV --out RESULT.json
        Reads a whole block device with O_DIRECT and maps the ranges that fail with EIO.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import mmap
import os
import random
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

BLOCK = 4096
CHUNK = 1 << 20
SCAN_UNIT = 64 << 10
_POOL_SIZE = 1 << 20
_pools: dict[int, bytes] = {}


def _pool(seed: int) -> bytes:
    pool = _pools.get(seed)
    if pool is None:
        period = random.Random(seed).randbytes(_POOL_SIZE)
        pool = _pools[seed] = period + period  # periodic: any window is content at its offset
    return pool


def _tag(seed: int, name: str) -> bytes:
    return hashlib.blake2b(f"{seed}/{name}".encode(), digest_size=16).digest()


def content(seed: int, name: str, start: int, end: int) -> bytes:
    """Bytes [start, end) of file `name`: pseudo-random, with a tag at each 4 KiB block."""
    if end <= start:
        return b""
    pool = _pool(seed)
    tag = _tag(seed, name)
    rotation = int.from_bytes(tag[:4], "little") % _POOL_SIZE
    first = start - start % BLOCK
    out = bytearray()
    position = first
    while position < end:
        take = min(end - position, _POOL_SIZE)
        source = (rotation + position) % _POOL_SIZE
        out += pool[source : source + take]
        position += take
    for offset in range(first, end, BLOCK):
        index = offset - first
        out[index : index + 16] = tag
        out[index + 16 : index + 24] = offset.to_bytes(8, "little")
    return bytes(out[start - first : end - first])


def describe(head: bytes, seed: int, names: list[str]) -> str:
    """What a wrong block holds, from its first 24 bytes: zeros, or which file's block at
    which offset (every block written by the workload carries that tag)."""
    if not head.strip(b"\0"):
        return "zeros"
    tags = {_tag(seed, name): name for name in names}
    name = tags.get(head[:16])
    if name is None:
        return "foreign bytes (no workload tag)"
    return f"{name} at offset {int.from_bytes(head[16:24], 'little')}"


def sha256_of(seed: int, name: str, size: int) -> str:
    digest = hashlib.sha256()
    for start in range(0, size, 4 * CHUNK):
        digest.update(content(seed, name, start, min(size, start + 4 * CHUNK)))
    return digest.hexdigest()


# ---- the writer --------------------------------------------------------------------------


def _log(handle: Any, **event: Any) -> None:
    event.setdefault("t", time.time())
    handle.write(json.dumps(event) + "\n")
    handle.flush()


def write_files(args: argparse.Namespace) -> int:
    rng = random.Random(f"{args.seed}/{args.prefix}/sizes")
    directory = os.path.join(args.dir, args.prefix)
    written = 0
    failures_in_a_row = 0
    with open(args.log, "a", buffering=1) as log:
        _log(log, ev="start", pid=os.getpid(), prefix=args.prefix)
        try:
            os.makedirs(directory, exist_ok=True)
            _fsync_dir(directory)
            _fsync_dir(args.dir)
        except OSError as error:
            _log(log, ev="err", name=args.prefix + "/", op="mkdir", errno=error.errno,
                 error=os.strerror(error.errno or 0))
            _log(log, ev="giveup", reason=f"cannot create {directory}: {error}")
            return 1
        index = 0
        began = time.monotonic()
        while not os.path.exists(args.stop_file):
            if args.rate:  # a steady workload: keep to `rate` bytes per second on average
                ahead = written / args.rate - (time.monotonic() - began)
                if ahead > 0:
                    time.sleep(min(ahead, 0.5))
                    continue
            if args.max_bytes and written >= args.max_bytes:
                _log(log, ev="done", reason="max bytes reached")
                return 0
            name = f"{args.prefix}/{index:06d}.bin"
            index += 1
            size = rng.randint(args.min_size, args.max_size)
            started = time.monotonic()
            step = "open"
            try:
                fd = os.open(os.path.join(args.dir, name),
                             os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                try:
                    step = "write"
                    for start in range(0, size, CHUNK):
                        data = content(args.seed, name, start, min(size, start + CHUNK))
                        view = memoryview(data)
                        while view:
                            view = view[os.write(fd, view):]
                    step = "fsync"
                    os.fsync(fd)
                finally:
                    os.close(fd)
                step = "fsync-dir"
                _fsync_dir(directory)
            except OSError as error:
                failures_in_a_row += 1
                _log(log, ev="err", name=name, size=size, op=step, errno=error.errno,
                     error=os.strerror(error.errno or 0))
                if failures_in_a_row >= args.give_up_after:
                    _log(log, ev="giveup", reason=f"{failures_in_a_row} failures in a row")
                    return 1
                time.sleep(0.2)
                continue
            failures_in_a_row = 0
            written += size
            _log(log, ev="ack", name=name, size=size,
                 seconds=round(time.monotonic() - started, 4))
        _log(log, ev="done", reason="stopped")
    return 0


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---- the checker -------------------------------------------------------------------------


@dataclass
class Span:
    """Bytes [file_offset, file_offset + length) of a file, found at `source_offset` of the
    source (the file itself, or the block device under the file system)."""

    file_offset: int
    source_offset: int
    length: int


def _spans(entry: dict[str, Any]) -> list[Span]:
    size = int(entry["size"])
    if entry.get("extents") is None:
        return [Span(0, 0, size)]
    spans = []
    for logical, physical, length in entry["extents"]:
        length = min(length, size - logical)
        if length > 0:
            spans.append(Span(logical, physical, length))
    return spans


class _AlignedBuffer:
    def __init__(self, size: int) -> None:
        self.map = mmap.mmap(-1, size)
        self.view = memoryview(self.map)

    def close(self) -> None:
        self.view.release()
        self.map.close()


def _read(fd: int, buffer: _AlignedBuffer, offset: int, length: int) -> bytes:
    """Read `length` bytes at `offset` (aligned to 4 KiB, O_DIRECT-safe); short at EOF."""
    aligned = (length + BLOCK - 1) // BLOCK * BLOCK
    done = os.preadv(fd, [buffer.view[:aligned]], offset)
    return bytes(buffer.view[: min(done, length)])


def _open_for_check(path: str) -> tuple[int, bool]:
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECT), True
    except OSError as error:
        if error.errno != errno.EINVAL:
            raise
    return os.open(path, os.O_RDONLY), False


def _ranges(indexes: list[int]) -> list[list[int]]:
    """[3, 4, 5, 9] -> [[3, 5], [9, 9]]"""
    out: list[list[int]] = []
    for index in sorted(indexes):
        if out and index == out[-1][1] + 1:
            out[-1][1] = index
        else:
            out.append([index, index])
    return out


def check_file(entry: dict[str, Any], seed: int, root: str | None, device_fd: int | None,
               buffer: _AlignedBuffer) -> dict[str, Any]:
    """Compare every byte of one file. Blocks (4 KiB of the file) are ok, unreadable (EIO),
    wrong (read, but not the bytes written), or missing (past a short read / no extent)."""
    name = entry["name"]
    size = int(entry["size"])
    result: dict[str, Any] = {"name": name, "size": size, "ok_bytes": 0, "eio": [], "wrong": [],
                              "missing": [], "error": None, "via": "device" if device_fd is not None
                              else "file"}
    blocks = (size + BLOCK - 1) // BLOCK
    if device_fd is not None:
        fd = device_fd
        covered: set[int] = set()
        for span in _spans(entry):
            covered.update(range(span.file_offset // BLOCK,
                                 (span.file_offset + span.length + BLOCK - 1) // BLOCK))
        missing = sorted(set(range(blocks)) - covered)
        result["missing"] = missing
    else:
        assert root is not None
        try:
            fd, _ = _open_for_check(os.path.join(root, name))
        except OSError as error:
            result["error"] = f"open: {os.strerror(error.errno or 0)}"
            result["errno"] = error.errno
            result["missing"] = list(range(blocks))
            return _finish(result)
        try:
            actual = os.fstat(fd).st_size
        except OSError:
            actual = size
        if actual != size:
            result["error"] = f"size {actual}, expected {size}"
    eio: list[int] = []
    wrong: list[int] = []
    samples: list[dict[str, Any]] = []
    missing_blocks: list[int] = result["missing"]
    try:
        for span in _spans(entry):
            position = 0
            while position < span.length:
                take = min(CHUNK, span.length - position)
                file_offset = span.file_offset + position
                source_offset = span.source_offset + position
                expected = content(seed, name, file_offset, file_offset + take)
                try:
                    data = _read(fd, buffer, source_offset, take)
                except OSError as error:
                    if error.errno != errno.EIO:
                        raise
                    data = None
                if data is not None and data == expected:
                    result["ok_bytes"] += take
                else:
                    # Block by block, to tell exactly which blocks are unreadable or wrong.
                    for inner in range(0, take, BLOCK):
                        piece = min(BLOCK, take - inner)
                        index = (file_offset + inner) // BLOCK
                        if data is not None and len(data) >= inner + piece:
                            got: bytes | None = data[inner : inner + piece]
                        else:
                            try:
                                got = _read(fd, buffer, source_offset + inner, piece)
                            except OSError as error:
                                if error.errno != errno.EIO:
                                    raise
                                got = None
                        if got is None:
                            eio.append(index)
                        elif len(got) < piece:
                            missing_blocks.append(index)
                        elif got != expected[inner : inner + piece]:
                            wrong.append(index)
                            if len(samples) < 4:  # what came back instead: see describe()
                                samples.append({"block": index, "head": got[:24].hex()})
                        else:
                            result["ok_bytes"] += piece
                position += take
    except OSError as error:
        result["error"] = f"read: {os.strerror(error.errno or 0)}"
        result["errno"] = error.errno
    finally:
        if device_fd is None:
            os.close(fd)
    result["eio"] = eio
    result["wrong"] = wrong
    result["wrong_samples"] = samples
    result["missing"] = missing_blocks
    return _finish(result)


def _finish(result: dict[str, Any]) -> dict[str, Any]:
    result["status"] = (
        "wrong" if result["wrong"] else
        "eio" if result["eio"] else
        "missing" if result["missing"] or result["error"] else
        "ok"
    )
    return result


def check(args: argparse.Namespace) -> int:
    with open(args.plan) as handle:
        plan = json.load(handle)
    buffer = _AlignedBuffer(CHUNK)
    device_fd = None
    if plan.get("device"):
        device_fd = os.open(plan["device"], os.O_RDONLY | os.O_DIRECT)
    results = []
    started = time.monotonic()
    try:
        for entry in plan["files"]:
            results.append(check_file(entry, args.seed, plan.get("root"), device_fd, buffer))
    finally:
        if device_fd is not None:
            os.close(device_fd)
        buffer.close()
    out = {"files": results, "seconds": time.monotonic() - started}
    tmp = args.out + ".tmp"
    with open(tmp, "w") as handle:
        json.dump(out, handle)
    os.replace(tmp, args.out)
    return 0


def scan(args: argparse.Namespace) -> int:
    """Which ranges of a block device fail with EIO (readable bytes are not judged)."""
    fd = os.open(args.device, os.O_RDONLY | os.O_DIRECT)
    buffer = _AlignedBuffer(CHUNK)
    size = os.lseek(fd, 0, os.SEEK_END)
    bad: list[int] = []  # 4 KiB block indexes
    readable = 0
    try:
        for offset in range(0, size, CHUNK):
            take = min(CHUNK, size - offset)
            try:
                readable += len(_read(fd, buffer, offset, take))
                continue
            except OSError as error:
                if error.errno != errno.EIO:
                    raise
            for inner in range(0, take, SCAN_UNIT):  # the map is at 64 KiB resolution
                piece = min(SCAN_UNIT, take - inner)
                try:
                    readable += len(_read(fd, buffer, offset + inner, piece))
                except OSError as error:
                    if error.errno != errno.EIO:
                        raise
                    bad.extend(range((offset + inner) // BLOCK,
                                     (offset + inner + piece) // BLOCK))
    finally:
        os.close(fd)
        buffer.close()
    out = {"size": size, "readable": readable, "eio_bytes": len(bad) * BLOCK,
           "eio_ranges": [[a * BLOCK, (b + 1) * BLOCK] for a, b in _ranges(bad)]}
    with open(args.out, "w") as handle:
        json.dump(out, handle)
    return 0


def iter_log(path: str) -> Iterator[dict[str, Any]]:
    """The events of a writer log; a torn last line (the writer still running) is skipped."""
    try:
        with open(path) as handle:
            for line in handle:
                if line.endswith("\n"):
                    yield json.loads(line)
    except FileNotFoundError:
        return


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scenario_lib.workload")
    commands = parser.add_subparsers(dest="command", required=True)
    w = commands.add_parser("write")
    w.add_argument("--dir", required=True)
    w.add_argument("--log", required=True)
    w.add_argument("--seed", type=int, required=True)
    w.add_argument("--prefix", required=True)
    w.add_argument("--min-size", type=int, required=True)
    w.add_argument("--max-size", type=int, required=True)
    w.add_argument("--stop-file", required=True)
    w.add_argument("--max-bytes", type=int, default=0)
    w.add_argument("--give-up-after", type=int, default=20)
    w.add_argument("--rate", type=int, default=0, help="bytes per second at most (0: no cap)")
    c = commands.add_parser("check")
    c.add_argument("--plan", required=True)
    c.add_argument("--out", required=True)
    c.add_argument("--seed", type=int, required=True)
    s = commands.add_parser("scan")
    s.add_argument("--device", required=True)
    s.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    return {"write": write_files, "check": check, "scan": scan}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
