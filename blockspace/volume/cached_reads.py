"""The read path with no await: a request served at once from memory.

When every column piece of a read lies in one slab, its checksum entries are in the
checksum page cache and its data in the page cache (`preadv(RWF_NOWAIT)`), the read is
served and verified in one synchronous call: no task, no timeout scope, no device await.
Anything else (a disk out, rot, another copy with a newer write, data not cached) answers
None, and the careful path (mirror.py, parity.py) takes the request. Per-request work here
is measured in microseconds (docs/benchmarks.md): no copies and no objects beyond the reply.
"""

from blockspace.disks.devices import Device
from blockspace.geometry.layouts import LayoutSpec, Piece, code_position, data_positions, segments
from blockspace.ondisk.checksums import CSUM_BLOCK, any_unwritten, bad_blocks, newer_elsewhere
from blockspace.volume.extent_io import ExtentIO, Extents
from blockspace.volume.pieces import BLOCK, align_down, align_up, scatter
from blockspace.volume.row_judge import needs_judging


class CachedReads:
    def __init__(self, io: ExtentIO, spec: LayoutSpec) -> None:
        self.io = io
        self.pool = io.pool
        self.spec = spec

    def piece_now(self, extents: Extents, piece: Piece) -> tuple[bytes, int] | None:
        """The whole blocks holding one piece, verified, and where the piece starts in them;
        None unless that can be had without waiting."""
        start = align_down(piece.column_offset)
        end = align_up(piece.column_offset + piece.length)
        source = self.source_now(extents, piece, start, end)
        if source is None:
            return None
        device, at, entries = source
        data = device.read_now(at, end - start)
        if data is None or bad_blocks(data, entries):
            return None
        if self.spec.kind == "parity" and self.behind_row_now(
                extents, piece.row, piece.column, start, end, entries):
            return None
        return data, piece.column_offset - start

    def behind_row_now(
        self, extents: Extents, row: int, index: int, start: int, end: int, entries: bytes
    ) -> bool:
        """Parity: could code fragment `index` of `row` (verified; `entries` of its extent
        bytes [start, end)) be behind its row, zeroed or missing a write? Asked of every
        read: the usual case (no entry says "never written", and the parity's write numbers
        are this column's) costs one search and a cached entry lookup per parity fragment.
        True also when the row's entries are not all cached (the careful path looks)."""
        spec = self.spec
        first, count = start // CSUM_BLOCK, (end - start) // CSUM_BLOCK
        candidates = range(spec.columns, spec.width)  # the parity fragments first
        if any_unwritten(entries):
            candidates = range(spec.width)
        by_index = {index: entries}
        for other in candidates:
            if other == index:
                continue
            disk_id, extent = extents[code_position(spec, row, other)]
            if self.pool.extent_device(disk_id, extent) is None:
                continue
            theirs = self.pool.checksums.read_cached(disk_id, extent, first, count)
            if theirs is None:
                return True
            by_index[other] = theirs
        return needs_judging(index, spec.columns, by_index)

    def source_now(
        self, extents: Extents, piece: Piece, start: int, end: int
    ) -> tuple[Device, int, bytes] | None:
        """Where to read blocks [start, end) of a piece at once: the preferred copy's
        device, the byte offset there, and the blocks' checksum entries. None unless the
        entries are cached and no other copy carries a newer write."""
        positions = data_positions(self.spec, piece.row, piece.column)
        disk_id, extent = extents[positions[0]]
        device = self.pool.extent_device(disk_id, extent)
        if device is None:
            return None
        first, count = start // BLOCK, (end - start) // BLOCK
        entries = self.pool.checksums.read_cached(disk_id, extent, first, count)
        if entries is None:
            return None
        for other in positions[1:]:  # mirror: no other copy may carry a newer write
            other_disk, other_extent = extents[other]
            if self.pool.extent_device(other_disk, other_extent) is None:
                return None  # degraded: counted and handled on the careful path
            theirs = self.pool.checksums.read_cached(other_disk, other_extent, first, count)
            if theirs is None or (theirs != entries and newer_elsewhere(entries, [theirs])):
                return None
        return device, self.pool.extent_offset(disk_id, extent) + start, entries

    def columns_now(self, extents: Extents, pieces: list[Piece], buffer: bytearray) -> bool:
        """Simple and mirror pieces of several columns, one read each, into `buffer`. A
        piece of whole blocks is read straight into its places there and verified there;
        others (a partial block at an end) through a buffer of their own. The pieces read
        in place are verified together, with one call: the per-call cost is paid once."""
        out = memoryview(buffer)
        read: list[memoryview] = []
        entries_read: list[bytes] = []
        for piece in pieces:
            if piece.column_offset % BLOCK or piece.length % BLOCK:
                found = self.piece_now(extents, piece)
                if found is None:
                    return False
                scatter(self.spec, out, piece, *found)
                continue
            end = piece.column_offset + piece.length
            source = self.source_now(extents, piece, piece.column_offset, end)
            if source is None:
                return False
            device, at, entries = source
            places = [out[buf : buf + count] for buf, _, count in segments(self.spec, piece)]
            if not device.read_now_into(at, places):
                return False
            read += places
            entries_read.append(entries)
        return not read or not bad_blocks(read, b"".join(entries_read))

    def spans_now(self, extents: Extents, pieces: list[Piece], buffer: bytearray) -> bool:
        """Parity pieces in several rows, into `buffer`: each disk's pieces lie in
        consecutive rows of its extent, so one read per disk covers them (with a parity
        unit in between, if any: read and verified too, and not used). False unless every
        span is in memory and verifies."""
        spans: dict[int, tuple[int, int]] = {}
        for piece in pieces:
            position = code_position(self.spec, piece.row, piece.column)
            start = align_down(piece.column_offset)
            end = align_up(piece.column_offset + piece.length)
            span = spans.get(position)
            spans[position] = (start, end) if span is None else (min(span[0], start),
                                                                  max(span[1], end))
        blocks: dict[int, tuple[bytes, bytes, int]] = {}
        for position, (start, end) in spans.items():
            disk_id, extent = extents[position]
            device = self.pool.extent_device(disk_id, extent)
            cached = self.io.cached_blocks(device, disk_id, extent, start, end) if device else None
            if cached is None or bad_blocks(*cached):
                return False
            blocks[position] = (cached[0], cached[1], start)
        for piece in pieces:
            data, entries, start = blocks[code_position(self.spec, piece.row, piece.column)]
            lo, hi = align_down(piece.column_offset), align_up(piece.column_offset + piece.length)
            mine = entries[(lo - start) // CSUM_BLOCK * 16 : (hi - start) // CSUM_BLOCK * 16]
            if self.behind_row_now(extents, piece.row, piece.column, lo, hi, mine):
                return False
            scatter(self.spec, buffer, piece, data, piece.column_offset - start)
        return True
