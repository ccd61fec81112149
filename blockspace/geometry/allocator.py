"""Extent allocation: which disks and extents a new slab's columns go to (pure, no I/O).

Each disk holds `extent_count` equal extents numbered 0..n-1. A slab of width `w` takes one
extent on each of `w` distinct disks. Placement rule (the btrfs one): the `w` disks with the
most free extents (ties to the lower disk id), and on each its lowest-numbered free extent.
This fills uneven disks completely whenever that is possible at all: three equal disks in a
2-way mirror give 1.5x one disk, and 1G + 1G + 2G in a 2-way mirror give 2G.

Capacity: with free counts `f_i`, at most `min(f_i, s)` of `s` slabs can touch disk `i`, so
`s` slabs need `sum(min(f_i, s)) >= w * s`. The largest such `s` is an upper bound for any
placement, and greedy most-free placement reaches it (after one greedy slab from a state that
admits `s` slabs, the rest still admits `s - 1`), so `max_slabs` computes it directly by a
binary search over `s` instead of simulating slab by slab.
"""

from __future__ import annotations

import heapq
from collections.abc import Collection, Iterable, Mapping
from itertools import compress
from operator import itemgetter
from typing import Any

from blockspace.errors import NoSpace

Extent = tuple[int, int]  # (disk_id, extent_index)

__all__ = ["Extent", "ExtentAllocator", "max_slabs", "usable_bytes"]


def _check_count(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, not {value!r}")
    return value


def _check_width(width: int) -> int:
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ValueError(f"slab width must be a positive integer, not {width!r}")
    return width


def _no_space(width: int, available: int) -> NoSpace:
    return NoSpace(
        f"not enough free space: a slab needs {width} disks with a free extent, "
        f"only {available} have one"
    )


class _DiskFree:
    """Free extents of one disk, lowest index first, without O(extent_count) state.

    Indices at or above `hwm` are free unless in `used`; free indices below `hwm` are all
    in the min-heap `holes` (released extents). `hwm` only moves up, so skipping used
    indices while advancing it costs O(1) amortized per extent over the disk's lifetime.
    """

    __slots__ = ("extent_count", "used", "hwm", "holes")

    def __init__(self, extent_count: int) -> None:
        self.extent_count = extent_count
        self.used: set[int] = set()
        self.hwm = 0
        self.holes: list[int] = []

    @property
    def free(self) -> int:
        return self.extent_count - len(self.used)

    def take_lowest(self) -> int:
        """Mark the lowest free extent used and return it. Caller ensures `free > 0`."""
        if self.holes:
            index = heapq.heappop(self.holes)
        else:
            while self.hwm in self.used:
                self.hwm += 1
            index = self.hwm
            self.hwm += 1
        self.used.add(index)
        return index

    def put_back(self, index: int) -> None:
        """Mark a used extent free again. Caller ensures `index in used`."""
        self.used.remove(index)
        if index < self.hwm:
            heapq.heappush(self.holes, index)


class ExtentAllocator:
    """Places slabs on the disks of a pool. Pure bookkeeping of used/free extents."""

    def __init__(self, disks: Mapping[int, int], used: Iterable[Extent] = ()) -> None:
        self._disks: dict[int, _DiskFree] = {}
        for disk_id, extent_count in disks.items():
            self.add_disk(disk_id, extent_count)
        used = list(used)
        if self._take_used(used):
            return
        for extent in used:  # something is wrong: find it, one extent at a time
            disk_id, index = self._check_extent(extent)
            state = self._disks[disk_id]
            if index in state.used:
                raise ValueError(f"extent {index} of disk {disk_id} is listed as used twice")
            state.used.add(index)

    @classmethod
    def counted(cls, disks: Mapping[int, int], in_use: Mapping[int, set[int]]
                ) -> ExtentAllocator:
        """An allocator whose used extents are `in_use` (disk id -> extent indexes, sets
        it takes over: a validated map's count, see ondisk/metadata.py `validate`), with
        the cheap checks only. ValueError if a disk is unknown or an extent out of range."""
        allocator = cls(disks)
        for disk_id, indexes in in_use.items():
            state = allocator._state(disk_id)
            if indexes and (min(indexes) < 0 or max(indexes) >= state.extent_count):
                raise ValueError(f"extents of disk {disk_id} out of range "
                                 f"({state.extent_count} extents)")
            state.used = indexes
        return allocator

    def _take_used(self, used: list[Extent]) -> bool:
        """Mark `used` used if every extent is sound and listed once (whole-list checks at
        C speed: a pool opens with 500k slabs); else change nothing and return False."""
        if not used:
            return True
        try:
            if set(map(len, used)) != {2}:
                return False
            present = set(map(itemgetter(0), used))
            if not present <= self._disks.keys():
                return False
        except TypeError:  # not pairs, or an unhashable disk id
            return False
        by_disk: dict[Any, list[Any]] = {  # one C-speed pass per disk
            disk_id: list(compress(map(itemgetter(1), used),
                                   map(disk_id.__eq__, map(itemgetter(0), used))))
            for disk_id in present}
        for disk_id, indexes in by_disk.items():
            if not indexes:
                continue
            state = self._disks[disk_id]
            if set(map(type, indexes)) != {int}:
                return False
            unique = set(indexes)
            if (len(unique) != len(indexes) or min(unique) < 0
                    or max(unique) >= state.extent_count or unique & state.used):
                return False
        for disk_id, indexes in by_disk.items():
            self._disks[disk_id].used.update(indexes)
        return True

    # -- queries -------------------------------------------------------------------------

    def _state(self, disk_id: int) -> _DiskFree:
        try:
            return self._disks[disk_id]
        except (KeyError, TypeError):
            raise ValueError(f"unknown disk {disk_id!r}") from None

    def _check_extent(self, extent: Extent) -> Extent:
        try:
            disk_id, index = extent
        except (TypeError, ValueError):
            raise ValueError(f"not an extent (disk_id, index): {extent!r}") from None
        state = self._state(disk_id)
        if isinstance(index, bool) or not isinstance(index, int):
            raise ValueError(f"extent index must be an integer, not {index!r}")
        if not 0 <= index < state.extent_count:
            raise ValueError(
                f"extent {index} is out of range for disk {disk_id} ({state.extent_count} extents)"
            )
        return disk_id, index

    @property
    def disk_ids(self) -> list[int]:
        """Known disk ids, ascending."""
        return sorted(self._disks)

    def extent_count(self, disk_id: int) -> int:
        return self._state(disk_id).extent_count

    def free_extents(self, disk_id: int) -> int:
        return self._state(disk_id).free

    def free_map(self) -> dict[int, int]:
        """disk_id -> number of free extents, for every disk (ascending id)."""
        return {disk_id: self._disks[disk_id].free for disk_id in sorted(self._disks)}

    def is_used(self, extent: Extent) -> bool:
        disk_id, index = self._check_extent(extent)
        return index in self._disks[disk_id].used

    def _candidates(self, exclude: Collection[int]) -> dict[int, int]:
        excluded = set(exclude)
        return {
            disk_id: state.free
            for disk_id, state in self._disks.items()
            if state.free > 0 and disk_id not in excluded
        }

    # -- allocation ----------------------------------------------------------------------

    def allocate(self, width: int, *, exclude: Collection[int] = ()) -> list[Extent]:
        """One slab: `width` extents on distinct disks not in `exclude`.

        Returns the extents ordered by the placement rule (most free disk first). Raises
        NoSpace and changes nothing when fewer than `width` eligible disks have a free extent.
        """
        _check_width(width)
        candidates = self._candidates(exclude)
        if len(candidates) < width:
            raise _no_space(width, len(candidates))
        return self._place(width, candidates)

    def _place(self, width: int, candidates: Mapping[int, int]) -> list[Extent]:
        chosen = heapq.nsmallest(width, candidates, key=lambda d: (-candidates[d], d))
        return [(disk_id, self._disks[disk_id].take_lowest()) for disk_id in chosen]

    def allocate_many(
        self, width: int, count: int, *, exclude: Collection[int] = ()
    ) -> list[list[Extent]]:
        """`count` slabs, all or nothing (fixed provisioning). NoSpace changes nothing."""
        _check_width(width)
        _check_count("slab count", count)
        candidates = self._candidates(exclude)
        fits = max_slabs(candidates, width)
        if fits < count:
            if len(candidates) < width:
                raise _no_space(width, len(candidates))
            raise NoSpace(
                f"not enough free space: {count} slabs of width {width} requested, only {fits} fit"
            )
        slabs: list[list[Extent]] = []
        for _ in range(count):
            slab = self._place(width, candidates)
            slabs.append(slab)
            for disk_id, _index in slab:
                candidates[disk_id] -= 1
                if candidates[disk_id] == 0:
                    del candidates[disk_id]
        return slabs

    def allocate_degraded(
        self, width: int, *, exclude: Collection[int], standby: Collection[int],
        max_absent: int,
    ) -> tuple[list[Extent], list[Extent]]:
        """One slab when too few eligible disks have room: extents on as many eligible
        disks as there are, the rest (at most `max_absent`) reserved on `standby` disks —
        disks out of service, whose extents a repair or replace rebuilds elsewhere.
        Returns (live extents, absent extents); NoSpace changes nothing."""
        _check_width(width)
        standby = set(standby)
        live = self._candidates(set(exclude) | standby)
        spare = self._candidates(set(self._disks) - standby)
        absent = max(0, width - len(live))
        if absent > max_absent or absent > len(spare):
            raise NoSpace(
                f"not enough free space: a slab needs {width} disks with a free extent, "
                f"{len(live)} in service have one, and at most {min(max_absent, len(spare))} "
                "of its extents may wait for a rebuild"
            )
        return self._place(width - absent, live), self._place(absent, spare) if absent else []

    def release(self, extents: Iterable[Extent]) -> None:
        """Free allocated extents. ValueError (and nothing freed) if any is not allocated."""
        checked: list[Extent] = []
        seen: set[Extent] = set()
        for extent in extents:
            disk_id, index = self._check_extent(extent)
            if index not in self._disks[disk_id].used:
                raise ValueError(f"extent {index} of disk {disk_id} is not allocated")
            if (disk_id, index) in seen:
                raise ValueError(f"extent {index} of disk {disk_id} is released twice")
            seen.add((disk_id, index))
            checked.append((disk_id, index))
        for disk_id, index in checked:
            self._disks[disk_id].put_back(index)

    # -- membership ----------------------------------------------------------------------

    def add_disk(self, disk_id: int, extent_count: int) -> None:
        if isinstance(disk_id, bool) or not isinstance(disk_id, int):
            raise ValueError(f"disk id must be an integer, not {disk_id!r}")
        _check_count(f"extent count of disk {disk_id}", extent_count)
        if disk_id in self._disks:
            raise ValueError(f"disk {disk_id} is already in the allocator")
        self._disks[disk_id] = _DiskFree(extent_count)

    def remove_disk(self, disk_id: int) -> None:
        state = self._state(disk_id)
        if state.used:
            raise ValueError(
                f"disk {disk_id} still has {len(state.used)} used extents; move them first"
            )
        del self._disks[disk_id]


def max_slabs(free: Mapping[int, int], width: int) -> int:
    """How many more slabs of `width` fit, given free extents per disk.

    The largest `s` with `sum(min(f, s) for f in free) >= width * s`, which is both an upper
    bound for any placement and what greedy most-free placement achieves. The left side minus
    the right is concave in `s` and zero at 0, so the feasible `s` form an interval [0, s*]
    and a binary search finds s*: O(disks * log(total free)).
    """
    _check_width(width)
    counts = [_check_count(f"free extents of disk {d}", f) for d, f in free.items()]
    counts = [f for f in counts if f > 0]
    if len(counts) < width:
        return 0
    lo, hi = 0, sum(counts) // width  # lo always fits; hi bounds the answer from above
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if sum(min(f, mid) for f in counts) >= width * mid:
            lo = mid
        else:
            hi = mid - 1
    return lo


def usable_bytes(free: Mapping[int, int], width: int, data_columns: int, slab_size: int) -> int:
    """Volume bytes that still fit: max_slabs * data_columns * slab_size."""
    _check_count("data columns", data_columns)
    _check_count("slab size", slab_size)
    if data_columns > width:
        raise ValueError(f"{data_columns} data columns do not fit in a slab of width {width}")
    return max_slabs(free, width) * data_columns * slab_size
