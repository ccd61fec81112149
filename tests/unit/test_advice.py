"""`pool status` says what is wrong and what to do (zpool status's status:/action: lines),
from the status document alone: every finding here from a hand-built document."""

from typing import Any

import pytest

from blockspace.admin.advice import Thresholds, advise, resiliency_key, thin_overcommit

MiB = 1 << 20
LIMITS = Thresholds(pool_full_percent=80, thin_overcommit_percent=100)


def disk(disk_id: int, state: str = "online", *, data: int = 4, free: int = 10,
         reason: str = "") -> dict[str, Any]:
    return {"id": disk_id, "path": f"/img/d{disk_id}.img", "state": state, "state_reason": reason,
            "data_extents": data, "free_extents": free, "used_bytes": data * 16 * MiB,
            "media": "hdd"}


def volume(name: str = "v", state: str = "online", *, size: int = 64 * MiB,
           provisioning: str = "thin", kind: str = "mirror", allocated: int = 0
           ) -> dict[str, Any]:
    return {"name": name, "state": state, "size": size, "provisioning": provisioning,
            "layout": {"kind": kind, "copies": 2, "parity": 0, "columns": 1, "interleave": 1},
            "allocated": allocated, "slabs": 1, "footprint": 2 * 16 * MiB}  # 2 disks wide


def status(disks: list[dict[str, Any]], volumes: list[dict[str, Any]] | None = None, *,
           health: str = "online", mountpoint: str | None = "/mnt/p", **extra: Any
           ) -> dict[str, Any]:
    return {"name": "p", "health": health, "slab_size": 16 * MiB, "mountpoint": mountpoint,
            "disks": disks,
            "volumes": volumes or [], "raw_size": 3 * 14 * 16 * MiB,
            "usable": {"simple": 400 * MiB, "mirror-2": 200 * MiB, "mirror-3": None,
                       "parity-1": 300 * MiB, "parity-2": None}, "actions": [], **extra}


def test_a_healthy_pool_needs_nothing() -> None:
    advice = advise(status([disk(0), disk(1), disk(2)], [volume()]), LIMITS)
    assert advice.status == "the pool is online; no action needed"
    assert advice.actions == []


def test_a_failed_disk_while_mounted_is_repaired_or_says_why_not() -> None:
    doc = status([disk(0, "failed", reason="write error"), disk(1), disk(2)],
                 [volume(state="degraded")], health="degraded")
    advice = advise(doc, LIMITS)
    assert "disk 0 (/img/d0.img) has failed: write error" in advice.status
    assert "redundancy is degraded" in advice.status
    assert "automatic repair is not running" in advice.status
    assert any("blockspace disk replace p 0 NEW_DISK" in a for a in advice.actions)
    assert "start it: `blockspace pool repair p`" in advice.actions


def test_no_spare_capacity_is_the_reason_repair_does_not_run() -> None:
    doc = status([disk(0, "failed", data=8), disk(1, free=3), disk(2, free=4)],
                 [volume(state="degraded")], health="degraded")
    advice = advise(doc, LIMITS)
    assert ("automatic repair is not running: no spare capacity to rebuild onto (8 extents "
            "to rebuild, 7 free on the disks in service)") in advice.status
    assert any(a.startswith("add a disk (`blockspace disk add p DISK`)")
               for a in advice.actions)


@pytest.mark.parametrize("mountpoint", ["/mnt/p", None])
def test_too_few_disks_left_is_no_spare_capacity(mountpoint: str | None) -> None:
    # a 2-disk mirror that lost one disk: the other holds the surviving copy, plenty of free
    # extents but no second disk to put the new copy on
    doc = status([disk(0, free=100), disk(1, "failed")], [volume(state="degraded")],
                 health="degraded", mountpoint=mountpoint)
    advice = advise(doc, LIMITS)
    assert ("automatic repair is not running: no spare capacity to rebuild onto (volume v "
            "needs 2 disks, 1 in service)") in advice.status
    assert "start it" not in " ".join(advice.actions)
    assert "not mounted" not in advice.status


def test_a_missing_disk_of_an_unmounted_pool() -> None:
    doc = status([disk(0), disk(1, "missing"), disk(2)], [volume(state="degraded")],
                 health="degraded", mountpoint=None)
    advice = advise(doc, LIMITS)
    assert "disk 1 (/img/d1.img) is missing" in advice.status
    assert "automatic repair is not running: the pool is not mounted" in advice.status
    assert any("blockspace disk online p 1" in a for a in advice.actions)


@pytest.mark.parametrize(("state", "said", "asked"), [
    ("resyncing", "is stale and being resynced", "wait for the resync to finish"),
    ("failing", "is failing (repeated checksum errors", "replace it soon: `blockspace disk "
                                                        "replace p 2 NEW_DISK`"),
])
def test_stale_and_failing_disks(state: str, said: str, asked: str) -> None:
    advice = advise(status([disk(0), disk(1), disk(2, state)], [volume()]), LIMITS)
    assert said in advice.status
    assert any(asked in a for a in advice.actions)


def test_a_running_rebuild_is_progress_not_a_repair_to_start() -> None:
    doc = status([disk(0, "failed"), disk(1), disk(2)], [volume(state="degraded")],
                 health="degraded", rebuild={"state": "running", "reason": "repair",
                                             "percent": 42.4})
    advice = advise(doc, LIMITS)
    assert "repair is running (42% done)" in advice.status
    assert "automatic repair is not running" not in advice.status
    assert "wait for it to finish (redundancy is reduced until then)" in advice.actions


def test_a_failed_rebuild_asks_for_another() -> None:
    doc = status([disk(0), disk(1), disk(2)], [volume()],
                 rebuild={"state": "failed", "reason": "retire disk 2", "failed": 3})
    advice = advise(doc, LIMITS)
    assert "the last rebuild (retire disk 2) failed: 3 moves failed" in advice.status
    assert any("blockspace pool repair p" in a for a in advice.actions)


def test_an_interrupted_job_resumes_at_mount() -> None:
    doc = status([disk(0), disk(1), disk(2, "retiring")], [volume()], mountpoint=None)
    advice = advise(doc, LIMITS, job={"op": "disk_retire", "reason": "retire disk 2"})
    assert "the retire disk 2 was interrupted by the last stop" in advice.status
    assert "mount the pool to resume it (`blockspace mount p MOUNTPOINT`)" in advice.actions


def test_a_failed_pool_says_data_is_lost() -> None:
    doc = status([disk(0, "failed"), disk(1, "failed"), disk(2)], [volume(state="failed")],
                 health="failed")
    assert "data is lost" in advise(doc, LIMITS).status


def test_fullness_above_the_configured_threshold() -> None:
    disks = [disk(0, data=12), disk(1, data=12), disk(2, data=11)]  # 35 of 42 extents: 83%
    assert "83% allocated (threshold 80%)" in advise(status(disks), LIMITS).status
    assert "allocated" not in advise(status(disks), Thresholds(90, 100)).status


def test_thin_volumes_promising_more_than_their_resiliency_holds() -> None:
    vols = [volume("a", size=150 * MiB, allocated=20 * MiB),
            volume("b", size=100 * MiB, allocated=10 * MiB),
            volume("c", size=500 * MiB, provisioning="fixed"),  # fixed: its space is taken
            volume("d", size=390 * MiB, kind="simple")]
    doc = status([disk(0), disk(1), disk(2)], vols)
    # mirror-2: 250M promised, 30M allocated + 200M fits = 230M; simple 390M of 400M fits
    assert thin_overcommit(doc, 100) == [("mirror-2", 250 * MiB, 230 * MiB)]
    assert thin_overcommit(doc, 110) == []
    assert thin_overcommit(doc, 90) == [("mirror-2", 250 * MiB, 230 * MiB),
                                        ("simple", 390 * MiB, 400 * MiB)]
    advice = advise(doc, LIMITS)
    assert ("thin mirror-2 volumes promise 250M, more than 100% of the 230M they can hold"
            in advice.status)
    assert any(a.startswith("add disks before the volumes fill up") for a in advice.actions)


def test_the_existing_actions_come_first_and_are_kept() -> None:
    doc = status([disk(0), disk(1), disk(2, "failing")], [volume()],
                 actions=["host file system under /img/d0.img is full: free space there"])
    advice = advise(doc, LIMITS)
    assert advice.actions[0] == "host file system under /img/d0.img is full: free space there"
    assert len(advice.actions) == 2
    assert advise(status([disk(0)], actions=["x"]), LIMITS).status == "the pool needs attention"


def test_resiliency_keys_match_the_usable_table() -> None:
    assert resiliency_key({"kind": "simple"}) == "simple"
    assert resiliency_key({"kind": "mirror", "copies": 3}) == "mirror-3"
    assert resiliency_key({"kind": "parity", "parity": 2}) == "parity-2"
