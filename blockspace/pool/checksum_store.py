"""Checksum entries on disk, behind a bounded page cache.

Each extent keeps its blocks' entries right after its data (see `label.DiskGeometry`).
Pages of entries (4 KiB = 256 blocks = 1 MiB of data) are cached, least recently used
first out, so RAM stays bounded whatever the pool holds (design invariant 5). Writes go
through to the disk and patch cached pages; a page being loaded while a write lands gets
the patch after it arrives, so the cache never holds an entry older than the disk's.
"""

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import trio

from blockspace.disks.devices import Buffer, Device
from blockspace.errors import DeviceError
from blockspace.ondisk.checksums import ENTRY_SIZE

PAGE = 4096
Key = tuple[int, int, int]  # disk id, extent, page index
Patches = list[tuple[Key, tuple[int, bytes]]]  # (page, (offset in page, bytes)) applied
DEFAULT_MAX_PAGES = 4096  # 16 MiB of entries: the checksums of 4 GiB of data
# RAM per cached page: the bytearray (4096 bytes + header), its key and the LRU entry
PAGE_FOOTPRINT = 4400


def cache_bound_bytes(max_pages: int = DEFAULT_MAX_PAGES) -> int:
    """The most RAM the page cache of one pool can hold (design invariant 5)."""
    return max_pages * PAGE_FOOTPRINT


@dataclass(frozen=True)
class ChecksumCacheStats:
    pages: int
    max_pages: int
    hits: int
    misses: int


def _cut(data: bytearray, page: int, start: int, end: int) -> bytes:
    """The part of cached page `page` that lies in the byte range [start, end)."""
    base = page * PAGE
    return bytes(data[max(start, base) - base : min(end, base + PAGE) - base])


class ChecksumStore:
    def __init__(
        self,
        device_of: Callable[[int], Device | None],
        area_offset: Callable[[int, int], int],
        *,
        max_pages: int = DEFAULT_MAX_PAGES,
    ) -> None:
        self._device_of = device_of
        self._area_offset = area_offset  # (disk id, extent) -> byte offset of its entries
        self._pages: OrderedDict[Key, bytearray] = OrderedDict()
        self._loading: dict[Key, list[tuple[int, bytes]]] = {}
        self._loaded: dict[Key, trio.Event] = {}
        self._inflight: dict[Key, list[tuple[int, bytes]]] = {}  # written, not yet on disk
        self.max_pages = max_pages
        self._hits = self._misses = 0

    def statistics(self) -> ChecksumCacheStats:
        return ChecksumCacheStats(len(self._pages), self.max_pages, self._hits, self._misses)

    async def read(self, disk_id: int, extent: int, first_block: int, count: int) -> bytes:
        """Entries of blocks [first_block, first_block + count) of an extent.
        Raises DeviceError if the disk cannot be read."""
        start, end = first_block * ENTRY_SIZE, (first_block + count) * ENTRY_SIZE
        return b"".join([_cut(await self._page(disk_id, extent, page), page, start, end)
                         for page in range(start // PAGE, (end - 1) // PAGE + 1)])

    async def read_from_disk(self, disk_id: int, extent: int, first_block: int,
                             count: int) -> bytes:
        """`read`, but from the disk itself and never from the cache: what a verify needs,
        since the cache holds what was written even when the disk dropped or damaged it."""
        device = self._device_of(disk_id)
        if device is None:
            raise DeviceError(f"disk {disk_id} is not available")
        start, end = first_block * ENTRY_SIZE, (first_block + count) * ENTRY_SIZE
        first_page, last_page = start // PAGE, (end - 1) // PAGE
        pages = await device.read(self._area_offset(disk_id, extent) + first_page * PAGE,
                                  (last_page - first_page + 1) * PAGE)
        return bytes(pages[start - first_page * PAGE : end - first_page * PAGE])

    def read_cached(self, disk_id: int, extent: int, first_block: int, count: int) -> bytes | None:
        """`read` when every page it needs is cached (the hot path: no await); else None."""
        start, end = first_block * ENTRY_SIZE, (first_block + count) * ENTRY_SIZE
        page = start // PAGE
        if (end - 1) // PAGE == page:  # the usual small read: one page, no lists
            key = (disk_id, extent, page)
            data = self._pages.get(key)
            if data is None:
                return None
            self._pages.move_to_end(key)
            self._hits += 1
            return bytes(data[start - page * PAGE : end - page * PAGE])
        pages = range(page, (end - 1) // PAGE + 1)
        found = [self._pages.get((disk_id, extent, page)) for page in pages]
        if any(data is None for data in found):
            return None
        parts = []
        for page, data in zip(pages, found, strict=True):
            assert data is not None
            self._pages.move_to_end((disk_id, extent, page))
            self._hits += 1
            parts.append(_cut(data, page, start, end))
        return b"".join(parts)

    async def write(
        self, disk_id: int, extent: int, first_block: int, entries: bytes,
        *, data: tuple[int, Buffer] | None = None,
    ) -> None:
        """Write entries through to the disk (not flushed) and into any cached page.
        With `data` = (device offset, bytes), write those blocks first, in the same device
        request (`Device.write_many`: one worker round trip for both)."""
        device = self._device_of(disk_id)
        if device is None:
            raise DeviceError(f"disk {disk_id} is not available")
        entries_at, patches = self.begin_write(disk_id, extent, first_block, entries)
        try:
            if data is None:
                await device.write(entries_at, entries)
            else:
                await device.write_many([data, (entries_at, entries)])
        finally:
            self.end_write(patches)

    def begin_write(
        self, disk_id: int, extent: int, first_block: int, entries: bytes
    ) -> tuple[int, Patches]:
        """For a caller that writes the entries itself: patch the cache and note the write
        as in flight. Returns where the entries go on the disk and what to pass to
        `end_write` once the write is over (done or failed)."""
        patches = self._patch(disk_id, extent, first_block * ENTRY_SIZE, entries)
        # Until the write is on the disk, a page loaded from the disk would miss it: loads
        # started meanwhile apply these patches (see _page).
        for key, patch in patches:
            self._inflight.setdefault(key, []).append(patch)
        return self.entries_at(disk_id, extent, first_block), patches

    def entries_at(self, disk_id: int, extent: int, first_block: int) -> int:
        """Device offset of the entry of block `first_block` of an extent."""
        return self._area_offset(disk_id, extent) + first_block * ENTRY_SIZE

    def end_write(self, patches: Patches) -> None:
        for key, patch in patches:
            pending = self._inflight[key]
            pending.remove(patch)
            if not pending:
                del self._inflight[key]

    def forget_extent(self, disk_id: int, extent: int, pages: int) -> None:
        """Drop cached pages of an extent that is being reused."""
        for page in range(pages):
            self._pages.pop((disk_id, extent, page), None)

    def forget_disk(self, disk_id: int) -> None:
        for key in [k for k in self._pages if k[0] == disk_id]:
            del self._pages[key]

    def _patch(
        self, disk_id: int, extent: int, start: int, entries: bytes
    ) -> Patches:
        """Apply entries to cached pages and to pages being loaded; returns the patches."""
        end = start + len(entries)
        patches = []
        for page in range(start // PAGE, (end - 1) // PAGE + 1):
            key = (disk_id, extent, page)
            lo = max(start, page * PAGE)
            hi = min(end, (page + 1) * PAGE)
            patch = (lo - page * PAGE, entries[lo - start : hi - start])
            patches.append((key, patch))
            cached = self._pages.get(key)
            if cached is not None:
                cached[patch[0] : patch[0] + len(patch[1])] = patch[1]
            elif hi - lo == PAGE:  # the write says the whole page: no need to load it later
                self._insert(key, bytearray(patch[1]))
            if key in self._loading:
                self._loading[key].append(patch)
        return patches

    def _insert(self, key: Key, data: bytearray) -> None:
        self._pages[key] = data
        self._pages.move_to_end(key)
        while len(self._pages) > self.max_pages:
            self._pages.popitem(last=False)

    async def _page(self, disk_id: int, extent: int, page: int) -> bytearray:
        key = (disk_id, extent, page)
        while True:
            cached = self._pages.get(key)
            if cached is not None:
                self._pages.move_to_end(key)
                self._hits += 1
                return cached
            pending = self._loaded.get(key)
            if pending is None:
                break
            await pending.wait()  # someone else is loading it; then look again
        self._misses += 1
        device = self._device_of(disk_id)
        if device is None:
            raise DeviceError(f"disk {disk_id} is not available")
        # Writes still on their way to the disk may or may not be in what we read: reapply
        # them (and any that start while we read) on top, oldest first.
        self._loading[key] = list(self._inflight.get(key, ()))
        self._loaded[key] = event = trio.Event()
        try:
            data = bytearray(await device.read(self._area_offset(disk_id, extent) + page * PAGE,
                                               PAGE))
            for offset, chunk in self._loading[key]:
                data[offset : offset + len(chunk)] = chunk
            self._insert(key, data)
            return data
        finally:
            del self._loading[key]
            del self._loaded[key]
            event.set()
