"""The daemon's observer on a real pool (memory disks): rebuild and scrub progress become
start/finish events, allocation crossing a threshold is an event, a disk's state change
reaches the log through Pool.on_event, failed requests are rate-limited events, and the
iostat snapshot covers every volume and disk."""

import errno
from pathlib import Path
from typing import Any

import trio
import trio.testing

from blockspace.events.log import EventLog, events_path
from blockspace.geometry.layouts import LayoutSpec
from blockspace.pool.pool import Pool
from blockspace.service.observe import Observer, Sources
from blockspace.testing.memory_device import MemoryDevice

MiB = 1 << 20


def test_the_observer_turns_changes_into_events(tmp_path: Path) -> None:
    rebuild: dict[str, Any] = {"state": "idle", "started": 0.0, "finished": 0.0}
    scrub: dict[str, Any] = {"state": "done", "started": 5.0, "finished": 6.0}  # before us

    async def main() -> None:
        devices = [MemoryDevice(64 * MiB, path=f"mem{i}") for i in range(2)]
        pool = await Pool.create("tank", devices, media=["hdd"] * 2, slab_size=4 * MiB,
                                 meta_slot_size=64 << 10)
        observer = Observer(Sources(pool, "tank", "/mnt", lambda: rebuild, lambda: scrub,
                                    dict), tmp_path, hooks=None)
        async with trio.open_nursery() as nursery:
            await observer.start(nursery)
            observer.mounted("online")
            await trio.sleep(1)
            rebuild.update(state="running", started=100.0, reason="repair")
            await trio.sleep(1)
            rebuild.update(state="done", finished=101.5, done=3, failed=0, bytes_moved=7)
            scrub.update(state="done", started=200.0, finished=200.1, volume="v",
                         bytes_checked=9, report={"repaired_blocks": 2, "unrecoverable": []})
            await trio.sleep(1)
            # Fill past 80 % of the raw space: a fixed volume allocates all its slabs.
            raw = sum(d.record.extent_count for d in pool.disks.values()) * pool.slab_size
            size = int(raw * 0.85) // 2 // pool.slab_size * pool.slab_size
            await pool.create_volume("big", size, LayoutSpec("mirror", 1, copies=2), "fixed")
            await trio.sleep(1)
            pool._set_state(1, "failing", "12 blocks failed their checksum")
            for _ in range(3):
                observer.on_io_error("big", "write", errno.ENOSPC)
            observer.on_io_error("big", "read", errno.EIO)
            snap = observer.snapshot()
            assert list(snap["volumes"]) == ["big"]
            assert [d["id"] for d in snap["disks"]] == [0, 1]
            assert snap["capacity"]["allocated_bytes"] >= 0.8 * raw
            await trio.sleep(1)
            nursery.cancel_scope.cancel()
        with trio.CancelScope(shield=True):
            await observer.stop()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0.01))
    events = EventLog(events_path(tmp_path, "tank")).read()
    classes = [e["class"] for e in events]
    assert classes == ["mount", "rebuild_start", "rebuild_finish", "scrub_start",
                       "scrub_finish", "threshold", "disk_state", "enospc", "io_error",
                       "unmount"]
    by_class = {e["class"]: e for e in events}
    assert by_class["rebuild_finish"]["result"] == "done"
    assert by_class["rebuild_finish"]["seconds"] == 1.5
    assert by_class["scrub_finish"]["repaired"] == 2
    assert by_class["threshold"]["threshold"] == 80.0
    assert by_class["threshold"]["direction"] == "up"
    assert by_class["disk_state"]["state"] == "failing"
    assert by_class["disk_state"]["old_state"] == "online"
    assert by_class["enospc"]["suppressed"] == 0  # the two after it were folded away
    assert all(e["pool"] == "tank" for e in events)
