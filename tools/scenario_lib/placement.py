"""Where a file's bytes live: file -> ext4 extents (FIEMAP) -> volume offsets -> slab, row,
column -> disk and byte offset in the disk image.

Reads the pool's on-disk labels and metadata straight from the image files with the
product's own pure decoders (`blockspace.ondisk.label`, `blockspace.ondisk.metadata`,
`blockspace.geometry.layouts`),
never writing anything. The trials use it to rot exactly the blocks of known files on one
disk, and to predict which blocks must stay readable when disks are lost (so "nothing on the
surviving disks was damaged" is checked block by block, not guessed).
"""

from __future__ import annotations

import array
import fcntl
import os
import random
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from blockspace.geometry.layouts import LayoutSpec, code_position, data_positions, split
from blockspace.ondisk.journal import decode_slot
from blockspace.ondisk.label import BLOCK, LABEL_SIZE, pick_label
from blockspace.ondisk.metadata import PoolMetadata

FS_IOC_FIEMAP = 0xC020660B
FIEMAP_FLAG_SYNC = 0x1
FIEMAP_EXTENT_LAST = 0x1
_FIEMAP_HEADER = struct.Struct("=QQLLLL")
_FIEMAP_EXTENT = struct.Struct("=QQQQQLLLL")


def fiemap(path: str) -> list[tuple[int, int, int]]:
    """(logical, physical, length) byte extents of a file, synced first."""
    extents: list[tuple[int, int, int]] = []
    start = 0
    batch = 256
    fd = os.open(path, os.O_RDONLY)
    try:
        while True:
            request = bytearray(_FIEMAP_HEADER.size + batch * _FIEMAP_EXTENT.size)
            _FIEMAP_HEADER.pack_into(request, 0, start, (1 << 64) - 1 - start,
                                     FIEMAP_FLAG_SYNC, 0, batch, 0)
            buffer = array.array("B", request)
            fcntl.ioctl(fd, FS_IOC_FIEMAP, buffer, True)
            raw = buffer.tobytes()
            mapped = _FIEMAP_HEADER.unpack_from(raw, 0)[3]
            if mapped == 0:
                break
            last = False
            for index in range(mapped):
                logical, physical, length, _, _, flags, *_ = _FIEMAP_EXTENT.unpack_from(
                    raw, _FIEMAP_HEADER.size + index * _FIEMAP_EXTENT.size)
                extents.append((logical, physical, length))
                start = logical + length
                last = bool(flags & FIEMAP_EXTENT_LAST)
            if last:
                break
    finally:
        os.close(fd)
    return extents


@dataclass(frozen=True)
class DiskPlace:
    disk_id: int
    data_start: int
    extent_stride: int
    path: str


@dataclass
class PoolMap:
    """The newest metadata generation found on the images, with each disk's geometry."""

    metadata: PoolMetadata
    disks: dict[int, DiskPlace] = field(default_factory=dict)

    @property
    def slab_size(self) -> int:
        return self.metadata.slab_size

    def states(self) -> dict[int, str]:
        return {record.disk_id: record.state for record in self.metadata.disks}


def read_pool_map(images: Iterable[str]) -> PoolMap:
    """Labels and metadata slots of every readable image; the highest generation wins."""
    best: PoolMetadata | None = None
    labels = {}
    for path in images:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            size = os.fstat(fd).st_size
            primary = os.pread(fd, LABEL_SIZE, 0)
            backup = os.pread(fd, LABEL_SIZE, (size // BLOCK) * BLOCK - LABEL_SIZE)
            label = pick_label(primary, backup)
            if label is None:
                continue
            labels[label.disk_uuid] = (label, path)
            geometry = label.geometry
            for slot in (0, 1):
                raw = os.pread(fd, geometry.meta_slot_size,
                               geometry.meta_offset + slot * geometry.meta_slot_size)
                try:
                    candidate = decode_slot(raw, label.pool_uuid)
                except Exception:  # a torn or foreign slot: the other one will do
                    continue
                if best is None or candidate.generation > best.generation:
                    best = candidate
        finally:
            os.close(fd)
    if best is None:
        raise RuntimeError("no readable pool metadata on the images")
    pool = PoolMap(best)
    for record in best.disks:
        found = labels.get(record.disk_uuid)
        if found is None:
            continue
        label, path = found
        pool.disks[record.disk_id] = DiskPlace(
            record.disk_id, label.geometry.data_start, label.geometry.extent_stride, path)
    return pool


@dataclass(frozen=True)
class BlockPlace:
    """One 4 KiB block of a volume: which disk offsets hold its data (`copies`: every copy of
    a mirror, the one data fragment of parity or simple) and every fragment of its stripe
    (parity: the k+m fragments at the same offset of the same row)."""

    volume_offset: int
    slab: int
    copies: tuple[tuple[int, int], ...]  # (disk_id, byte offset in the disk image)
    stripe: tuple[tuple[int, int], ...]


class VolumeMap:
    def __init__(self, pool: PoolMap, volume: str) -> None:
        record = pool.metadata.volume(volume)
        self.pool = pool
        self.spec = LayoutSpec.from_dict(record.layout)
        self.slabs = record.slabs
        self.slab_data = self.spec.slab_data_size(pool.slab_size)

    def lost_slabs(self, dead: set[int]) -> list[int]:
        """Slabs with more extents on dead disks than the layout tolerates."""
        return sorted(slab for slab, extents in self.slabs.items()
                      if sum(d in dead for d, _ in extents) > self.spec.tolerance)

    def _disk_offset(self, slab: int, position: int, column_offset: int) -> tuple[int, int]:
        disk_id, extent = self.slabs[slab][position]
        place = self.pool.disks.get(disk_id)
        if place is None:  # disk not among the images: keep the disk id, offset unknown
            return disk_id, -1
        return disk_id, place.data_start + extent * place.extent_stride + column_offset

    def locate(self, volume_offset: int) -> BlockPlace | None:
        """None when the block is in a slab that is not allocated (reads as zeros)."""
        slab, within = divmod(volume_offset, self.slab_data)
        if slab not in self.slabs:
            return None
        (piece,) = split(self.spec, within, BLOCK)
        positions = data_positions(self.spec, piece.row, piece.column)
        copies = tuple(self._disk_offset(slab, p, piece.column_offset) for p in positions)
        if self.spec.kind == "parity":
            stripe = tuple(
                self._disk_offset(slab, code_position(self.spec, piece.row, i),
                                  piece.column_offset)
                for i in range(self.spec.width)
            )
        else:
            stripe = copies
        return BlockPlace(volume_offset, slab, copies, stripe)

    def readable(self, place: BlockPlace, dead: set[int],
                 rotted: frozenset[tuple[int, int]] | set[tuple[int, int]] = frozenset()) -> bool:
        """Can the pool still return this block's data, with disks `dead` gone and the
        (disk, offset) blocks in `rotted` corrupt?"""

        def good(where: tuple[int, int]) -> bool:
            return where[0] not in dead and where not in rotted

        if any(good(where) for where in place.copies):
            return True
        if self.spec.kind != "parity":
            return False
        bad = sum(not good(where) for where in place.stripe)
        return bad <= self.spec.parity


def file_blocks(extents: Sequence[tuple[int, int, int]], size: int) -> list[tuple[int, int]]:
    """(file block index, volume offset) of every 4 KiB block of a file's data."""
    out = []
    for logical, physical, length in extents:
        length = min(length, size - logical)
        for inner in range(0, max(0, length), BLOCK):
            out.append(((logical + inner) // BLOCK, physical + inner))
    return out


def volume_blocks(volume_offset: int) -> list[int]:
    """The 4 KiB-aligned volume blocks that a 4 KiB file block at `volume_offset` touches
    (two when the file system's blocks are smaller than 4 KiB)."""
    first = volume_offset - volume_offset % BLOCK
    return [first] if first == volume_offset else [first, first + BLOCK]


def rot(image: str, offsets: Iterable[int], rng: random.Random) -> int:
    """Flip bytes (XOR with non-zero values) at 8 random places in each 4 KiB block at the
    given offsets of an image file, as media rot would; returns the number of blocks."""
    count = 0
    fd = os.open(image, os.O_RDWR)
    try:
        for offset in offsets:
            block = bytearray(os.pread(fd, BLOCK, offset))
            for _ in range(8):
                where = rng.randrange(len(block))
                block[where] ^= rng.randrange(1, 256)
            os.pwrite(fd, bytes(block), offset)
            count += 1
        os.fsync(fd)
    finally:
        os.close(fd)
    return count
