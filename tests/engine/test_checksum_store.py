"""The checksum page cache never serves an entry older than one already written."""

import trio
import trio.testing

from blockspace.ondisk.checksums import entries_for
from blockspace.pool.checksum_store import ChecksumStore
from blockspace.testing.memory_device import MemoryDevice


class SlowWriteDevice(MemoryDevice):
    """Writes wait for `release`; reads do not: a write still on its way to the disk."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.release = trio.Event()

    async def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        await self.release.wait()
        await super().write(offset, data)


def test_a_page_loaded_while_an_entry_write_is_in_flight_includes_that_write() -> None:
    async def scenario() -> None:
        device = SlowWriteDevice(1 << 20)
        store = ChecksumStore(lambda disk_id: device, lambda disk_id, extent: 0)
        new = entries_for(b"n" * 4096, seq=7)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(store.write, 0, 0, 3, new)
            await trio.testing.wait_all_tasks_blocked()
            # The page is not cached; the disk still has the old (zero) entry.
            assert await store.read(0, 0, 3, 1) == new
            device.release.set()
        assert await store.read(0, 0, 3, 1) == new
        assert bytes(device.data[48:64]) == new

    trio.run(scenario)


def test_cache_is_bounded_and_write_through() -> None:
    async def scenario() -> None:
        device = MemoryDevice(4 << 20)
        store = ChecksumStore(lambda disk_id: device, lambda disk_id, extent: 0, max_pages=4)
        for page in range(10):
            entry = entries_for(bytes([page]) * 4096, seq=page)
            await store.write(0, 0, page * 256, entry)
            assert await store.read(0, 0, page * 256, 1) == entry
        assert store.statistics().pages <= 4
        for page in range(10):  # evicted pages come back from the disk intact
            assert await store.read(0, 0, page * 256, 1) == entries_for(
                bytes([page]) * 4096, seq=page
            )

    trio.run(scenario)


def test_a_write_with_its_data_is_one_device_request_and_keeps_the_cache_right() -> None:
    """Data and entries go through `Device.write_many` together; while that request is on
    its way, a page load still gets the new entries, and afterwards both are on the disk."""

    class Recording(SlowWriteDevice):
        def __init__(self, size: int) -> None:
            super().__init__(size)
            self.requests: list[list[int]] = []

        async def write_many(self, pieces: list[tuple[int, bytes]]) -> None:  # type: ignore[override]
            self.requests.append([offset for offset, _ in pieces])
            await super().write_many(pieces)

    async def scenario() -> None:
        device = Recording(1 << 20)
        store = ChecksumStore(lambda disk_id: device, lambda disk_id, extent: 0)
        block = b"n" * 4096
        new = entries_for(block, seq=9)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                lambda: store.write(0, 0, 5, new, data=(65536, memoryview(block)))
            )
            await trio.testing.wait_all_tasks_blocked()
            assert await store.read(0, 0, 5, 1) == new  # loaded while the write is pending
            device.release.set()
        assert device.requests == [[65536, 80]]
        assert bytes(device.data[65536:69632]) == block
        assert bytes(device.data[80:96]) == new
        assert await store.read(0, 0, 5, 1) == new

    trio.run(scenario)


def test_the_cache_stays_within_its_stated_ram_bound() -> None:
    """`cache_bound_bytes` (what the benchmark reports) holds for a full cache."""
    import tracemalloc

    from blockspace.pool.checksum_store import cache_bound_bytes

    async def scenario() -> None:
        device = MemoryDevice(8 << 20)
        store = ChecksumStore(lambda disk_id: device, lambda disk_id, extent: 0, max_pages=256)
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for extent in range(2):
                for page in range(256):
                    await store.read(0, extent, page * 256, 1)
            used = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        assert store.statistics().pages == 256
        assert used <= cache_bound_bytes(256)

    trio.run(scenario)


def test_read_cached_answers_only_from_cached_pages() -> None:
    async def scenario() -> None:
        device = MemoryDevice(4 << 20)
        store = ChecksumStore(lambda disk_id: device, lambda disk_id, extent: 0)
        assert store.read_cached(0, 0, 0, 1) is None  # nothing cached yet
        entries = entries_for(bytes(range(256)) * 16 * 600, seq=9)  # 600 blocks: 3 pages
        await store.write(0, 0, 0, entries)
        assert store.read_cached(0, 0, 0, 600) is None  # a write does not load pages
        assert await store.read(0, 0, 0, 600) == entries
        assert store.read_cached(0, 0, 0, 600) == entries  # across page boundaries
        assert store.read_cached(0, 0, 255, 2) == entries[255 * 16 : 257 * 16]
        assert store.read_cached(0, 1, 0, 1) is None  # another extent

    trio.run(scenario)


def test_a_write_of_a_whole_page_of_entries_caches_it_and_a_partial_one_does_not() -> None:
    async def scenario() -> None:
        device = MemoryDevice(4 << 20)
        store = ChecksumStore(lambda disk_id: device, lambda disk_id, extent: 0, max_pages=2)
        whole = entries_for(b"w" * (256 * 4096), seq=3)  # 256 blocks: one page of entries
        await store.write(0, 0, 256, whole)
        assert store.read_cached(0, 0, 256, 256) == whole  # no load needed
        assert store.statistics().misses == 0
        await store.write(0, 0, 512 + 1, entries_for(b"p" * 4096, seq=4))
        assert store.read_cached(0, 0, 513, 1) is None  # the rest of that page is unknown
        for page in (3, 4, 5):  # the bound holds for pages put in by writes too
            await store.write(0, 0, page * 256, entries_for(bytes([page]) * (256 * 4096), 5))
        assert store.statistics().pages == 2
        assert await store.read(0, 0, 256, 256) == whole  # evicted, then loaded from disk

    trio.run(scenario)
