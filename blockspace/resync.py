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

from blockspace.checksums import CSUM_BLOCK, bad_blocks, block_ok
from blockspace.devices import Device
from blockspace.errors import DeviceError
from blockspace.layouts import code_position, data_positions, row_start

if TYPE_CHECKING:
    from blockspace.volume import Extents, Volume

log = logging.getLogger(__name__)


async def read_raw(
    volume: "Volume", extents: "Extents", position: int, start: int, end: int
) -> tuple[bytes, bytes] | None:
    """Data and checksum entries of extent blocks [start, end), unverified; None if the disk
    is out or the read fails."""
    disk_id, extent = extents[position]
    device: Device | None = volume.pool.device(disk_id)
    if device is None:
        return None
    try:
        entries = await volume.pool.checksums.read(
            disk_id, extent, start // CSUM_BLOCK, (end - start) // CSUM_BLOCK
        )
        data = await device.read(volume.pool.extent_offset(disk_id, extent) + start, end - start)
    except DeviceError:
        return None
    return data, entries


def _blocks(data: bytes, entries: bytes) -> list[tuple[bytes, bytes]]:
    count = len(data) // CSUM_BLOCK
    return [
        (data[i * CSUM_BLOCK : (i + 1) * CSUM_BLOCK], entries[i * 16 : (i + 1) * 16])
        for i in range(count)
    ]


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
    positions = data_positions(volume.spec, 0, column)  # same set of copies for every row
    copies = {}
    for position in sorted(positions):
        raw = await read_raw(volume, extents, position, start, end)
        if raw is not None:
            copies[position] = raw
    if not copies:
        return 0
    order = sorted(copies)
    split = {position: _blocks(*copies[position]) for position in order}
    chosen = bytearray()
    for index in range(len(split[order[0]])):
        good = [p for p in order if block_ok(*split[p][index])]
        chosen += split[good[0] if good else order[0]][index][0]
    rewritten = 0
    for position, (data, entries) in copies.items():
        if data != chosen or bad_blocks(data, entries):
            await volume._write_verified(extents, position, start, bytes(chosen))
            rewritten += (end - start) // CSUM_BLOCK
    return rewritten


async def _resync_parity(volume: "Volume", extents: "Extents", start: int, end: int) -> int:
    assert volume.codec is not None
    spec = volume.spec
    rewritten = 0
    for row in range(start // spec.interleave, end // spec.interleave):
        offset = row_start(spec, row)
        span = (offset, offset + spec.interleave)
        fragments = []
        for index in range(spec.width):
            raw = await read_raw(volume, extents, code_position(spec, row, index), *span)
            fragments.append(raw)
        if any(raw is None for raw in fragments):
            log.warning(
                "volume %s: row %d of a dirty region has a disk missing; parity not recomputed "
                "(write hole possible there)", volume.name, row,
            )
            continue
        data = [raw[0] for raw in fragments[: spec.columns] if raw is not None]
        parity = volume.codec.encode(data)
        for index, raw in enumerate(fragments):
            assert raw is not None
            wanted = data[index] if index < spec.columns else parity[index - spec.columns]
            if raw[0] != wanted or bad_blocks(raw[0], raw[1]):
                position = code_position(spec, row, index)
                await volume._write_verified(extents, position, offset, wanted)
                rewritten += spec.interleave // CSUM_BLOCK
    return rewritten
