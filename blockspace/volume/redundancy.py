"""What a volume and its repairs ask of a redundancy kind, and what they get back.

One object per kind implements `Redundancy`: `mirror.Mirror` (simple and mirror volumes:
copies of each column) and `parity.Parity` (k data + m parity fragments per row). As with
ZFS's vdev ops tables (vdev_mirror.c, vdev_raidz.c), the I/O path and the repairs ask the
object, never branch on the kind; each kind's self-heal lives once, in its object, and a
scrub, a region resync, a returning disk's catch-up and a move use it.
"""

from dataclasses import dataclass, field
from typing import Protocol

from blockspace.geometry.layouts import Piece
from blockspace.volume.extent_io import Extents


@dataclass
class Counters:
    """What the redundancy paths add to a volume's statistics."""

    degraded_reads: int = 0  # reads that found a copy or column out and used the others
    healed_blocks: int = 0  # blocks rewritten in place by a read's self-heal


@dataclass
class Check:
    """What checking an extent range of one slab found (a scrub adds these up)."""

    bytes_checked: int = 0
    blocks_checked: int = 0
    checksum_errors: int = 0  # blocks (mirror) or fragments (parity) failing their checksum
    mismatches: int = 0  # copies that differ / parity that does not match its data
    repaired_blocks: int = 0
    # Data that no redundancy could vouch for: (data column, extent offset, length).
    unrecoverable: list[tuple[int, int, int]] = field(default_factory=list)


class Redundancy(Protocol):
    """The operations of one kind. `extents` is the slab's map as the caller read it;
    every method but `read_now`, `read_column` and `write_pieces` expects the caller to
    hold the row locks of the range."""

    def read_now(self, extents: Extents, pieces: list[Piece], buffer: bytearray) -> bool:
        """Several pieces of one slab into `buffer` with no await (cached_reads.py); False
        if any is not in memory or fails its checksum."""

    async def read_column(
        self, slab: int, extents: Extents, row: int, column: int, start: int, end: int,
        *, locked: bool,
    ) -> bytes:
        """Extent blocks [start, end) of a data column in `row`, verified: from another
        copy or rebuilt when its own is out or bad, and healed in place. `locked`: the
        caller holds the row locks (else they are taken for the careful part)."""

    async def write_pieces(
        self, slab: int, extents: Extents, pieces: list[Piece], data: memoryview, seq: int
    ) -> None:
        """Write a request's pieces (whole blocks) as write number `seq`, with whatever
        redundancy they need; Unrecoverable if more was lost than the layout tolerates."""

    async def extent_contents(
        self, slab: int, extents: Extents, position: int, start: int, end: int
    ) -> tuple[bytes, bytes]:
        """Verified data and checksum entries of extent bytes [start, end) at `position`,
        from the extent itself or rebuilt from the others: what a move copies."""

    async def check(
        self, slab: int, extents: Extents, start: int, end: int, *, repair: bool
    ) -> Check:
        """Read and verify everything stored for extent bytes [start, end) of the slab,
        compare the redundancy, and (with `repair`) rewrite what is bad: a scrub's step."""

    async def make_consistent(self, extents: Extents, start: int, end: int) -> int:
        """A region an unclean stop left dirty (region_resync.py): make its copies or its
        parity agree again. Returns blocks rewritten."""

    async def catch_up(self, slab: int, extents: Extents, position: int, since: int) -> int:
        """The extent at `position`, of a returning disk, awaiting its catch-up in
        `Pool.resyncing` (repair/readmit.py): bring it up to date with the writes numbered
        `since` or later that it missed, and take it out of `Pool.resyncing` once it is.
        Returns bytes rewritten."""
