"""A request's pieces in and out of its buffer, and the block alignment of device I/O.

`layouts.split` cuts a request into one piece per data column (per row for parity);
`layouts.segments` says where a piece's bytes lie in the request buffer. Device I/O below
works in whole 4 KiB blocks (the checksum granularity). Pure: no I/O.
"""

from blockspace.geometry.layouts import LayoutSpec, Piece, segments
from blockspace.ondisk.checksums import CSUM_BLOCK

BLOCK = CSUM_BLOCK


def align_down(value: int) -> int:
    return value - value % BLOCK


def align_up(value: int) -> int:
    return -(-value // BLOCK) * BLOCK


def gather(spec: LayoutSpec, data: memoryview, piece: Piece) -> memoryview | bytes:
    """A piece's bytes out of the request buffer, in disk order (no copy when they are
    contiguous there)."""
    parts = segments(spec, piece)
    if len(parts) == 1:
        return data[piece.buf_offset : piece.buf_offset + piece.length]
    return b"".join([data[buf : buf + count] for buf, _, count in parts])


def scatter(
    spec: LayoutSpec, out: bytearray | memoryview, piece: Piece, blocks: bytes, skip: int
) -> None:
    """Lay a piece read from disk (starting `skip` bytes into `blocks`) into the request
    buffer."""
    source = memoryview(blocks)
    for buf, at, count in segments(spec, piece):
        out[buf : buf + count] = source[skip + at : skip + at + count]
