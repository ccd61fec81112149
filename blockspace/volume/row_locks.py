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
    """Locks that rows hash onto, made when first taken and dropped when let go: a volume
    nobody writes holds none (an empty volume used to cost 4096 locks, 1.4 MiB), a busy one
    at most `count`, whatever its size. Collisions only serialize two unrelated rows; locks
    are taken in index order."""

    def __init__(self, count: int = 4096) -> None:
        self._count = count
        self._table: dict[int, trio.Lock] = {}

    def __len__(self) -> int:
        """How many lock objects exist now (held, or waited for)."""
        return len(self._table)

    def hold(self, keys: Iterable[RowKey]) -> "HeldRows":
        """`async with locks.hold(keys):` the rows' locks, held for the block."""
        return HeldRows(self._table, sorted({hash(k) % self._count for k in keys}))


class HeldRows:
    """The context manager of `RowLocks.hold`, written out as a class: it is on the path of
    every write, where a generator-based one costs a few microseconds more.

    A lock is looked up (or made) only right before it is taken, with no await in between,
    and dropped from the table on release only when nobody took it over: a trio Lock hands
    itself to the next waiter on release, so an unlocked one has no waiters."""

    __slots__ = ("_table", "_indexes", "_taken")

    def __init__(self, table: dict[int, trio.Lock], indexes: list[int]) -> None:
        self._table = table
        self._indexes = indexes
        self._taken: list[tuple[int, trio.Lock]] = []

    async def __aenter__(self) -> None:
        waited = False
        table = self._table
        waiting: tuple[int, trio.Lock] | None = None
        try:
            for index in self._indexes:
                lock = table.get(index)
                if lock is None:
                    lock = table[index] = trio.Lock()
                try:  # uncontended, the usual case: no trip through the scheduler
                    lock.acquire_nowait()
                except trio.WouldBlock:
                    waiting = (index, lock)
                    await lock.acquire()
                    waiting = None
                    waited = True
                self._taken.append((index, lock))
            if not waited:
                await trio.lowlevel.checkpoint_if_cancelled()
        except BaseException:
            self._release()
            if waiting is not None:  # a cancelled waiter: drop the lock if it is now idle
                self._drop_if_idle(*waiting)
            raise

    async def __aexit__(self, *_: object) -> None:
        self._release()

    def _release(self) -> None:
        while self._taken:
            index, lock = self._taken.pop()
            lock.release()
            self._drop_if_idle(index, lock)

    def _drop_if_idle(self, index: int, lock: trio.Lock) -> None:
        if not lock.locked() and self._table.get(index) is lock:
            del self._table[index]


def slab_rows(spec: LayoutSpec, slab: int, start: int, end: int) -> list[RowKey]:
    """Lock keys of the rows a range [start, end) of a slab's volume data touches."""
    row_bytes = spec.interleave * spec.columns
    return [(slab, row) for row in range(start // row_bytes, (end - 1) // row_bytes + 1)]


def column_rows(spec: LayoutSpec, slab: int, start: int, end: int) -> list[RowKey]:
    """Lock keys of the rows an extent byte range [start, end) of a slab lies in."""
    unit = spec.interleave
    return [(slab, row) for row in range(start // unit, (end - 1) // unit + 1)]
