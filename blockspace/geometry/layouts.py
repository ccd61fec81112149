"""Resiliency layouts: the geometry of a slab, as pure functions.

A slab is `width` extents on distinct disks; `positions` below index that extent list.
Volume data in a slab is striped over the data columns in `interleave`-byte units; a row
is one unit at the same offset in every extent of the slab.

- simple: data column c lives at position c.
- mirror: copy j of data column c lives at position c * copies + j.
- parity: code fragment i (0..k-1 data, k..k+m-1 parity) of row r lives at position
  (i + r) % width, so parity rotates over all disks of the slab.
"""

from dataclasses import dataclass
from typing import NamedTuple

from blockspace.errors import InvalidInput

KINDS = ("simple", "mirror", "parity")
DEFAULT_INTERLEAVE = 64 << 10
MAX_DEFAULT_WIDTH = 8


@dataclass(frozen=True)
class LayoutSpec:
    kind: str
    columns: int
    copies: int = 1
    parity: int = 0
    interleave: int = DEFAULT_INTERLEAVE

    @property
    def width(self) -> int:
        """Extents per slab, each on its own disk."""
        return self.columns * self.copies + self.parity

    @property
    def tolerance(self) -> int:
        """How many disks a slab can lose and still be read."""
        return {"simple": 0, "mirror": self.copies - 1, "parity": self.parity}[self.kind]

    @property
    def efficiency(self) -> float:
        return self.columns / self.width

    def slab_data_size(self, slab_size: int) -> int:
        """Volume bytes one slab holds."""
        return self.columns * slab_size

    def describe(self) -> str:
        if self.kind == "mirror":
            return f"mirror-{self.copies}"
        if self.kind == "parity":
            return f"parity-{self.parity} ({self.columns}+{self.parity})"
        return f"simple ({self.columns} col)"

    def to_dict(self) -> dict[str, int | str]:
        return {
            "kind": self.kind,
            "columns": self.columns,
            "copies": self.copies,
            "parity": self.parity,
            "interleave": self.interleave,
        }

    @classmethod
    def from_dict(cls, data: dict[str, int | str]) -> "LayoutSpec":
        return cls(
            kind=str(data["kind"]),
            columns=int(data["columns"]),
            copies=int(data["copies"]),
            parity=int(data["parity"]),
            interleave=int(data["interleave"]),
        )

    def validate(self, slab_size: int, disk_count: int) -> None:
        """InvalidInput unless this layout can be placed on `disk_count` disks."""
        if self.kind not in KINDS:
            raise InvalidInput(f"unknown resiliency {self.kind!r} (choose {', '.join(KINDS)})")
        if self.kind == "mirror" and self.copies not in (2, 3):
            raise InvalidInput(f"mirror needs --copies 2 or 3, not {self.copies}")
        if self.kind == "parity" and self.parity not in (1, 2):
            raise InvalidInput(f"parity needs --parity 1 or 2, not {self.parity}")
        if self.kind != "mirror" and self.copies != 1:
            raise InvalidInput("--copies applies to mirror volumes only")
        if self.kind != "parity" and self.parity != 0:
            raise InvalidInput("--parity applies to parity volumes only")
        min_columns = 2 if self.kind == "parity" else 1
        if self.columns < min_columns:
            raise InvalidInput(f"{self.kind} needs at least {min_columns} data columns")
        interleave = self.interleave
        if interleave < 4096 or interleave & (interleave - 1) or interleave > slab_size:
            raise InvalidInput(
                f"interleave must be a power of two from 4K to the slab size, not {interleave}"
            )
        if self.width > disk_count:
            raise InvalidInput(
                f"{self.describe()} needs at least {self.width} disks, the pool has {disk_count}"
            )


def default_layout(
    kind: str,
    disk_count: int,
    *,
    copies: int | None = None,
    parity: int | None = None,
    columns: int | None = None,
    interleave: int | None = None,
) -> LayoutSpec:
    """The layout a user gets when they name only the resiliency.

    Like Storage Spaces: simple stripes over every disk (up to 8); parity uses every disk
    (up to 8) with m of them for parity, so dual parity works on 4 disks (2+2). Mirror
    defaults to one column: each slab then needs only `copies` disks, which lets the
    allocator fill uneven disks completely.
    """
    if kind not in KINDS:
        raise InvalidInput(f"unknown resiliency {kind!r} (choose {', '.join(KINDS)})")
    if kind == "mirror":
        copies = 2 if copies is None else copies
        columns = 1 if columns is None else columns
        spec = LayoutSpec(kind, columns, copies=copies, parity=parity or 0)
    elif kind == "parity":
        parity = 1 if parity is None else parity
        if columns is None:
            columns = max(2, min(disk_count, MAX_DEFAULT_WIDTH) - parity)
        spec = LayoutSpec(kind, columns, copies=copies or 1, parity=parity)
    else:
        columns = max(1, min(disk_count, MAX_DEFAULT_WIDTH)) if columns is None else columns
        spec = LayoutSpec(kind, columns, copies=copies or 1, parity=parity or 0)
    if interleave is not None:
        spec = LayoutSpec(spec.kind, spec.columns, spec.copies, spec.parity, interleave)
    return spec


class Piece(NamedTuple):
    """A part of a request that is contiguous in one data column of one slab. For simple
    and mirror it may span rows: then its bytes are contiguous on disk but lie in the
    request buffer as one interleave unit per row (see `segments`). A named tuple: a large
    request makes one per column, on the hot path."""

    row: int  # first row the piece touches
    column: int  # data column, 0..columns-1
    column_offset: int  # byte offset inside the column's extent
    length: int
    buf_offset: int  # offset of the piece's first byte inside the request buffer
    rows: int = 1  # rows spanned


def split(spec: LayoutSpec, offset: int, length: int) -> list[Piece]:
    """Cut a slab-relative byte range into pieces, one per data column it touches, in the
    order of their first bytes in the request.

    For simple and mirror, a column's units in consecutive rows follow each other on disk,
    so they make one piece: a large request costs one device I/O per column, not one per
    row and column. Parity pieces never cross a row, because the column's disk changes
    from row to row.
    """
    if length <= 0:
        return []
    unit = spec.interleave
    columns = spec.columns
    first, last = offset // unit, (offset + length - 1) // unit  # global unit indexes
    if first == last:  # inside one stripe unit: the usual small request
        row, column = divmod(first, columns)
        return [Piece(row, column, row * unit + offset - first * unit, length, 0)]
    end = offset + length
    pieces = []
    if spec.kind == "parity":  # one piece per stripe unit
        for u in range(first, last + 1):
            row, column = divmod(u, columns)
            start, stop = max(offset, u * unit), min(end, (u + 1) * unit)
            pieces.append(Piece(row, column, row * unit + start - u * unit, stop - start,
                                start - offset))
        return pieces
    for u in range(first, min(last, first + columns - 1) + 1):  # each column's first unit
        row, column = divmod(u, columns)
        final = last - (last - u) % columns  # the column's last unit in the request
        start = max(offset, u * unit)
        stop = min(end, (final + 1) * unit)
        column_offset = row * unit + start - u * unit
        column_end = (final // columns) * unit + stop - final * unit
        pieces.append(Piece(row, column, column_offset, column_end - column_offset,
                            start - offset, final // columns - row + 1))
    return pieces


def segments(spec: LayoutSpec, piece: Piece) -> list[tuple[int, int, int]]:
    """Where a piece's bytes lie in the request buffer: (buffer offset, offset in the
    piece, length) per row it spans."""
    if piece.rows == 1 or spec.columns == 1:
        return [(piece.buf_offset, 0, piece.length)]
    unit = spec.interleave
    skip = unit * (spec.columns - 1)  # the other columns' units between two of ours
    found = []
    buf, done, position = piece.buf_offset, 0, piece.column_offset
    while done < piece.length:
        take = min(unit - position % unit, piece.length - done)
        found.append((buf, done, take))
        buf += take + skip
        done += take
        position += take
    return found


def unit_range(spec: LayoutSpec, piece: Piece) -> tuple[int, int]:
    """The [start, end) byte range of a single-row piece inside its interleave unit."""
    start = piece.column_offset - piece.row * spec.interleave
    return start, start + piece.length


def data_positions(spec: LayoutSpec, row: int, column: int) -> list[int]:
    """Extent positions holding data column `column` in `row`, preferred copy first."""
    if spec.kind == "mirror":
        first = row % spec.copies  # spread reads of a mirror over its copies
        return [column * spec.copies + (first + j) % spec.copies for j in range(spec.copies)]
    if spec.kind == "parity":
        return [code_position(spec, row, column)]
    return [column]


def absent_positions(spec: LayoutSpec, count: int) -> list[int]:
    """Where a slab placed short of `count` disks (at most the tolerance) leaves its
    absent extents: for a mirror, the last copies of different columns, so every column
    keeps a live copy; for parity any positions do (they rotate by row)."""
    if not 0 <= count <= spec.tolerance:
        raise ValueError(f"{count} absent extents exceed the tolerance of {spec.describe()}")
    if spec.kind == "mirror":
        return [
            (i % spec.columns) * spec.copies + spec.copies - 1 - i // spec.columns
            for i in range(count)
        ]
    return list(range(spec.width - count, spec.width))


def code_position(spec: LayoutSpec, row: int, index: int) -> int:
    """Parity layouts: the extent position of code fragment `index` in `row`."""
    return (index + row) % spec.width


def parity_positions(spec: LayoutSpec, row: int) -> list[int]:
    return [code_position(spec, row, spec.columns + i) for i in range(spec.parity)]


def row_start(spec: LayoutSpec, row: int) -> int:
    """Byte offset in every extent where `row` begins."""
    return row * spec.interleave


ExtentWrite = tuple[int, int, bytes | memoryview]  # extent position, offset in it, payload


def coalesce(writes: list[ExtentWrite]) -> list[ExtentWrite]:
    """Merge writes to the same extent that follow each other into one (payloads joined)."""
    merged: list[tuple[int, int, list[bytes | memoryview]]] = []
    for position, offset, payload in sorted(writes, key=lambda w: (w[0], w[1])):
        if merged:
            last_position, last_offset, parts = merged[-1]
            if last_position == position and last_offset + sum(map(len, parts)) == offset:
                parts.append(payload)
                continue
        merged.append((position, offset, [payload]))
    return [(position, offset, parts[0] if len(parts) == 1 else b"".join(parts))
            for position, offset, parts in merged]
