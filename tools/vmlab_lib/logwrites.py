"""Read and replay dm-log-writes logs (the kernel's Documentation/admin-guide/device-mapper/
log-writes.rst; the same format xfstests' replay-log reads).

Layout of the log device, in units of the logged device's logical block size `sectorsize`:

  block 0     super: le64 magic 0x6a736677736872, le64 version 1, le64 nr_entries,
              le32 sectorsize
  block 1...  entries, one after the other: a header block
                le64 sector, le64 nr_sectors, le64 flags, le64 data_len
              (a mark's name follows the header inside the same block), then, unless the
              entry is a discard, nr_sectors blocks of the data that was written.

Entries are logged in completion order, flushes with LOG_FLUSH_FLAG, FUA writes with
LOG_FUA_FLAG, and `dmsetup message DEV 0 mark NAME` adds a LOG_MARK_FLAG entry. Replaying a
disk's log up to a mark onto a zeroed device of the same size gives the disk as it was when
the mark was taken.
"""

from __future__ import annotations

import dataclasses
import os
import struct
from collections.abc import Iterator
from pathlib import Path

MAGIC = 0x6A736677736872
VERSION = 1
FLUSH, FUA, DISCARD, MARK, METADATA = 1, 2, 4, 8, 16
_SUPER = struct.Struct("<QQQI")
_ENTRY = struct.Struct("<QQQQ")


class LogError(Exception):
    pass


@dataclasses.dataclass(frozen=True)
class Entry:
    index: int
    sector: int  # in units of the log's sectorsize
    nr_sectors: int
    flags: int
    data_offset: int  # byte offset of the data in the log (writes)
    mark: str | None

    @property
    def kind(self) -> str:
        if self.flags & MARK:
            return "mark"
        if self.flags & DISCARD:
            return "discard"
        if self.nr_sectors == 0:
            return "flush" if self.flags & FLUSH else "empty"
        return "write"


class Log:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        with open(self.path, "rb") as f:
            head = f.read(_SUPER.size)
        if len(head) < _SUPER.size:
            raise LogError(f"{path}: too short for a dm-log-writes super block")
        magic, version, self.nr_entries, self.sectorsize = _SUPER.unpack(head)
        if magic != MAGIC:
            raise LogError(f"{path}: not a dm-log-writes log (magic {magic:#x})")
        if version != VERSION:
            raise LogError(f"{path}: unsupported dm-log-writes version {version}")
        if self.sectorsize not in (512, 1024, 2048, 4096):
            raise LogError(f"{path}: odd sector size {self.sectorsize}")

    def entries(self, *, limit: int | None = None) -> Iterator[Entry]:
        """The entries in log order. The super block's count is updated on FUA writes and
        marks only, so entries past it are read too while their headers are plausible."""
        size = self.path.stat().st_size
        offset = self.sectorsize
        index = 0
        with open(self.path, "rb") as f:
            while offset + self.sectorsize <= size:
                if limit is not None and index >= limit:
                    return
                f.seek(offset)
                block = f.read(self.sectorsize)
                sector, nr_sectors, flags, data_len = _ENTRY.unpack_from(block)
                known = FLUSH | FUA | DISCARD | MARK | METADATA
                plausible = (flags & ~known) == 0 and data_len < self.sectorsize and (
                    flags != 0 or nr_sectors != 0)
                if not plausible:
                    if index < self.nr_entries:
                        raise LogError(f"{self.path}: entry {index} at byte {offset} is "
                                       "damaged")
                    return
                mark = None
                if flags & MARK:
                    raw = block[_ENTRY.size : _ENTRY.size + data_len]
                    mark = raw.split(b"\0", 1)[0].decode(errors="replace")
                data_offset = offset + self.sectorsize
                yield Entry(index, sector, nr_sectors, flags, data_offset, mark)
                offset = data_offset
                if not flags & DISCARD:
                    offset += nr_sectors * self.sectorsize
                index += 1

    def marks(self) -> list[Entry]:
        return [e for e in self.entries() if e.mark is not None]

    def find_mark(self, name: str) -> Entry:
        for entry in self.entries():
            if entry.mark == name:
                return entry
        raise LogError(f"{self.path}: no mark {name!r}")

    def replay(self, target: str | Path, *, mark: str | None = None,
               stop_index: int | None = None) -> int:
        """Apply the entries before `mark` (or before entry `stop_index`, or all of them)
        to `target`, a zeroed file or device as large as the logged one. Discards are
        replayed as zeros. Returns the number of entries applied."""
        if mark is not None:
            stop_index = self.find_mark(mark).index
        applied = 0
        fd = os.open(str(target), os.O_WRONLY)
        try:
            with open(self.path, "rb") as log:
                for entry in self.entries(limit=stop_index):
                    position = entry.sector * self.sectorsize
                    length = entry.nr_sectors * self.sectorsize
                    if entry.kind == "write":
                        log.seek(entry.data_offset)
                        data = log.read(length)
                        if len(data) != length:
                            raise LogError(f"{self.path}: entry {entry.index} is cut short")
                        os.pwrite(fd, data, position)
                    elif entry.kind == "discard":
                        for start in range(0, length, 1 << 23):
                            count = min(1 << 23, length - start)
                            os.pwrite(fd, bytes(count), position + start)
                    applied += 1
            os.fsync(fd)
        finally:
            os.close(fd)
        return applied
