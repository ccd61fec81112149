"""Row locks: what keeps a volume's writers, healers and movers of one row apart.

Every write holds the locks of the rows it touches, so a parity read-modify-write, a
partial-block write, a heal or two mirror writes to one row never interleave; a scrub, a
region resync, a returning disk's catch-up and a move hold them over the extent range they
work on. A lock key is (slab, row): a row is one interleave unit at the same offset in
every extent of the slab.
"""

from collections.abc import Iterable

import trio

from blockspace.geometry.layouts import LayoutSpec

RowKey = tuple[int, int]  # (slab, row)


class RowLocks:
    """A fixed array of locks that rows hash onto: bounded memory, whatever the volume size.
    Collisions only serialize two unrelated rows; locks are taken in index order."""

    def __init__(self, count: int = 4096) -> None:
        self._locks = [trio.Lock() for _ in range(count)]

    def hold(self, keys: Iterable[RowKey]) -> "HeldRows":
        """`async with locks.hold(keys):` the rows' locks, held for the block."""
        return HeldRows([self._locks[i] for i in sorted({hash(k) % len(self._locks)
                                                         for k in keys})])


class HeldRows:
    """The context manager of `RowLocks.hold`, written out as a class: it is on the path of
    every write, where a generator-based one costs a few microseconds more."""

    __slots__ = ("_locks", "_taken")

    def __init__(self, locks: list[trio.Lock]) -> None:
        self._locks = locks
        self._taken: list[trio.Lock] = []

    async def __aenter__(self) -> None:
        waited = False
        try:
            for lock in self._locks:
                try:  # uncontended, the usual case: no trip through the scheduler
                    lock.acquire_nowait()
                except trio.WouldBlock:
                    await lock.acquire()
                    waited = True
                self._taken.append(lock)
            if not waited:
                await trio.lowlevel.checkpoint_if_cancelled()
        except BaseException:
            self._release()
            raise

    async def __aexit__(self, *_: object) -> None:
        self._release()

    def _release(self) -> None:
        while self._taken:
            self._taken.pop().release()


def slab_rows(spec: LayoutSpec, slab: int, start: int, end: int) -> list[RowKey]:
    """Lock keys of the rows a range [start, end) of a slab's volume data touches."""
    row_bytes = spec.interleave * spec.columns
    return [(slab, row) for row in range(start // row_bytes, (end - 1) // row_bytes + 1)]


def column_rows(spec: LayoutSpec, slab: int, start: int, end: int) -> list[RowKey]:
    """Lock keys of the rows an extent byte range [start, end) of a slab lies in."""
    unit = spec.interleave
    return [(slab, row) for row in range(start // unit, (end - 1) // unit + 1)]
