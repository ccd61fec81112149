"""Region resync after an unclean stop: make each region the write-intent log left dirty
consistent again. (Not to be confused with a returning disk's catch-up, repair/readmit.py.)

Only regions the write-intent log left dirty are visited. There, a write may have reached
some columns and not others, or its data and not its checksum. Block-device semantics allow
either the old or the new contents of an unacknowledged write, never garbage, so:

- mirror: per block, the first copy whose checksum verifies wins (else the first readable
  copy); every copy and checksum is made equal to it.
- parity: the row is judged (volume/row_judge.py); what it locates and can rebuild soundly
  (proved by a spare fragment, or from fragments all of one write) is rebuilt; otherwise
  the data columns are taken as they are (old or new per block) and parity is recomputed
  from them. Every fragment of a row that was changed or looked behind its row is then
  rewritten with one write number, so no mark of the tear is later taken for damage. This
  closes the write hole for rows whose disks are all present. A row with a disk missing
  cannot be made consistent (its missing column depends on the parity being right): it is
  left as is and logged.
- simple: checksums are rewritten to match the data.

Each kind's rule is its `Redundancy.make_consistent` (mirror.py, parity.py); this module
keeps the account of what is still dirty and resyncs a region under its row locks.

A write that found no room on a host file system for some of its copies (`HostSpaceError`)
leaves its regions in the same state; `defer` puts them back here and keeps them dirty in
the log, so they are resynced before the next I/O into them (or at the next mount). A resync
that itself finds no room leaves the region pending, and is not tried again while a host
is still full.

The cost of trusting data inside a dirty region: a block that also rotted on the disk in
that same region is accepted. Outside dirty regions, checksums keep their full force.
"""

import logging

from blockspace.geometry.layouts import LayoutSpec
from blockspace.pool.intent import region_size
from blockspace.volume.extent_io import ExtentIO
from blockspace.volume.redundancy import Redundancy
from blockspace.volume.row_locks import RowLocks, column_rows, slab_rows

log = logging.getLogger(__name__)

Region = tuple[int, int]  # (slab, region)


def regions_touched(spec: LayoutSpec, size: int, slab: int, start: int, end: int) -> set[int]:
    """Intent regions of `size` extent bytes that a range [start, end) of a slab's volume
    data touches."""
    unit = spec.interleave
    return {row * unit // size for _, row in slab_rows(spec, slab, start, end)}


class RegionResync:
    """The dirty regions of one volume, until each is resynced (`pending`: the set itself
    is kept, never replaced, so the cached read path can look at it directly)."""

    def __init__(
        self, io: ExtentIO, key: int, spec: LayoutSpec, locks: RowLocks, redundancy: Redundancy
    ) -> None:
        self.io = io
        self.pool = io.pool
        self.key = key
        self.spec = spec
        self.locks = locks
        self.redundancy = redundancy
        # Write-intent regions, in extent bytes: a whole number of rows.
        self.region_size = region_size(spec.interleave)
        self.pending: set[Region] = {(s, r) for k, s, r in self.pool.recovering if k == key}
        self.blocked: set[Region] = set()  # pending, last resync cut short by a full host

    def defer(self, slab: int, regions: set[int]) -> None:
        """Regions a write left half done for want of host space: resynced like an unclean
        stop's, kept dirty in the write-intent log (and recorded at a clean stop) till then."""
        keys = {(self.key, slab, region) for region in regions}
        self.pending.update((slab, region) for region in regions)
        self.pool.recovering.update(keys)
        if self.pool.intent is not None:
            self.pool.intent.hold(keys)

    def regions(self, slab: int, start: int, end: int) -> set[int]:
        """Intent regions a range [start, end) of a slab's volume data touches."""
        return regions_touched(self.spec, self.region_size, slab, start, end)

    async def resync_all(self) -> int:
        """Resync every region the last unclean stop left dirty; returns regions done."""
        done = 0
        for slab, region in sorted(self.pending):
            await self.resync_region(slab, region)
            done += 1
        return done

    async def resync_region(self, slab: int, region: int) -> None:
        start = region * self.region_size
        end = min(start + self.region_size, self.pool.slab_size)
        async with self.locks.hold(column_rows(self.spec, slab, start, end)):
            if (slab, region) not in self.pending:
                return  # another task got here first
            extents = self.io.record.slabs.get(slab)
            if extents is not None:
                refused = self.pool.host_space_errors
                blocks = await self.redundancy.make_consistent(extents, start, end)
                if self.pool.host_space_errors != refused:  # not every copy rewritten
                    self.blocked.add((slab, region))
                    log.warning("volume %s: slab %d region %d not resynced yet: a host file "
                                "system is full", self.io.name, slab, region)
                    return
                if blocks:
                    log.info("volume %s: resynced slab %d region %d (%d blocks rewritten)",
                             self.io.name, slab, region, blocks)
            self.pending.discard((slab, region))
            self.blocked.discard((slab, region))
            key = (self.key, slab, region)
            self.pool.recovering.discard(key)
            if self.pool.intent is not None:
                self.pool.intent.release(key)

    async def before_io(self, slab: int, start: int, end: int) -> None:
        """I/O into a region still awaiting resync waits for it: nothing inconsistent is
        ever read or used for a parity read-modify-write."""
        if self.pending:
            for region in self.regions(slab, start, end):
                if (slab, region) in self.blocked and self.pool.host_full:
                    continue  # no room yet: the I/O goes on (reads take the newest copy)
                if (slab, region) in self.pending:
                    await self.resync_region(slab, region)
