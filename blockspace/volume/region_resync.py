"""Resync after an unclean stop: make one dirty region consistent again.

Only regions the write-intent log left dirty are visited. There, a write may have reached
some columns and not others, or its data and not its checksum. Block-device semantics allow
either the old or the new contents of an unacknowledged write, never garbage, so:

- mirror: per block, the first copy whose checksum verifies wins (else the first readable
  copy); every copy and checksum is made equal to it.
- parity: the data columns are taken as they are (old or new per block), their checksums are
  rewritten to match, and parity is recomputed from them. This closes the write hole for
  rows whose disks are all present. A row with a disk missing cannot be made consistent
  (its missing column depends on the parity being right): it is left as is and logged.
- simple: checksums are rewritten to match the data.

The cost of trusting data inside a dirty region: a block that also rotted on the disk in
that same region is accepted. Outside dirty regions, checksums keep their full force.
The caller holds the row locks of the region.
"""

import logging
from typing import TYPE_CHECKING

from blockspace.geometry.layouts import code_position, row_start
from blockspace.ondisk.checksums import (
    CSUM_BLOCK,
    ENTRY_SIZE,
    bad_blocks,
    choose_blocks,
    entries_for,
    entry_at,
    entry_seq,
)

if TYPE_CHECKING:
    from blockspace.volume.volume import Extents, Volume

log = logging.getLogger(__name__)


async def resync_region(volume: "Volume", extents: "Extents", start: int, end: int) -> int:
    """Make extent bytes [start, end) of one slab consistent; returns blocks rewritten."""
    if volume.spec.kind == "parity":
        return await _resync_parity(volume, extents, start, end)
    rewritten = 0
    for column in range(volume.spec.columns):
        rewritten += await _resync_copies(volume, extents, column, start, end)
    return rewritten


async def _resync_copies(
    volume: "Volume", extents: "Extents", column: int, start: int, end: int
) -> int:
    copies, _ = await volume.read_copies_raw(extents, column, start, end)
    if not copies:
        return 0
    choice = choose_blocks(copies)
    # A block no copy verifies was torn between data and checksum: its data (old or new,
    # both legal for a write never acknowledged) is kept and given a matching checksum.
    first = copies[min(copies)]
    for index in choice.unrecoverable:
        lo, hi = index * CSUM_BLOCK, (index + 1) * CSUM_BLOCK
        seq = max(entry_seq(entry_at(entries, index)) for _, entries in copies.values())
        choice.data[lo:hi] = first[0][lo:hi]
        choice.entries[index * ENTRY_SIZE : (index + 1) * ENTRY_SIZE] = entries_for(
            first[0][lo:hi], seq
        )
        for position in copies:
            choice.repairs.setdefault(position, []).append(index)
    rewritten = 0
    for position, indexes in sorted(choice.repairs.items()):
        rewritten += await volume._write_runs(
            extents, position, start, sorted(set(indexes)), choice.data, choice.entries
        )
    return rewritten


async def _resync_parity(volume: "Volume", extents: "Extents", start: int, end: int) -> int:
    assert volume.codec is not None
    spec = volume.spec
    rewritten = 0
    for row in range(start // spec.interleave, end // spec.interleave):
        offset = row_start(spec, row)
        span = (offset, offset + spec.interleave)
        fragments: list[tuple[bytes, bytes] | None] = []
        for index in range(spec.width):
            raw = await volume._read_raw(extents, code_position(spec, row, index), *span)
            fragments.append(raw if isinstance(raw, tuple) else None)
        if any(raw is None for raw in fragments):
            log.warning(
                "volume %s: row %d of a dirty region has a disk missing; parity not recomputed "
                "(write hole possible there)", volume.name, row,
            )
            continue
        data = [raw[0] for raw in fragments[: spec.columns] if raw is not None]
        seq = volume.pool.next_seq()
        parity = volume.codec.encode(data)
        for index, fragment in enumerate(fragments):
            assert fragment is not None
            wanted = data[index] if index < spec.columns else parity[index - spec.columns]
            if fragment[0] != wanted or bad_blocks(fragment[0], fragment[1]):
                position = code_position(spec, row, index)
                await volume._write_verified(extents, position, offset, wanted, seq=seq)
                rewritten += spec.interleave // CSUM_BLOCK
    return rewritten
