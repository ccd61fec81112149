"""What `pool status` says is wrong and what to do about it (zpool status's `status:` and
`action:` lines), from the status document alone: pure, so every case is a unit test.

`advise` reads the plain status dict (admin/pools.py `pool_status`, plus the daemon's
`rebuild` progress when mounted, plus the interrupted job recorded in the state directory
when not) and returns one `status` sentence and the list of actions."""

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from blockspace.units import format_size

# Disk states that hold no usable copy of their data: the redundancy of their volumes is
# reduced until a rebuild or a resync brings it back.
LOST_STATES = ("failed", "missing")
# Disks a rebuild may write to.
IN_SERVICE = ("online", "failing", "resyncing")


@dataclass(frozen=True)
class Thresholds:
    pool_full_percent: int = 80
    thin_overcommit_percent: int = 100


@dataclass(frozen=True)
class Advice:
    status: str
    actions: list[str]


def resiliency_key(layout: dict[str, Any]) -> str:
    """The `usable` table's key for a volume's layout (simple, mirror-2, parity-1 ...)."""
    kind = str(layout.get("kind"))
    if kind == "mirror":
        return f"mirror-{layout.get('copies')}"
    if kind == "parity":
        return f"parity-{layout.get('parity')}"
    return kind


def _disk_findings(disks: list[dict[str, Any]], pool: str) -> Iterable[tuple[str, str]]:
    for d in disks:
        state, name = d["state"], f"disk {d['id']} ({d['path']})"
        if state == "failed":
            yield (f"{name} has failed" + (f": {d['state_reason']}" if d.get("state_reason")
                                           else ""),
                   f"replace it: `blockspace disk replace {pool} {d['id']} NEW_DISK` "
                   f"(or rebuild onto free space: `blockspace pool repair {pool}`)")
        elif state == "missing":
            yield (f"{name} is missing",
                   f"reconnect it and take it back with `blockspace disk online {pool} "
                   f"{d['id']}`, or replace it: `blockspace disk replace {pool} {d['id']} "
                   "NEW_DISK`")
        elif state == "resyncing":
            yield (f"{name} is stale and being resynced",
                   "wait for the resync to finish (its progress shows here)")
        elif state == "failing":
            yield (f"{name} is failing (repeated checksum errors; its copies are healed)",
                   f"replace it soon: `blockspace disk replace {pool} {d['id']} NEW_DISK`")


def _repair_findings(status: dict[str, Any], job: dict[str, Any] | None
                     ) -> Iterable[tuple[str, str]]:
    """A running, failed or interrupted rebuild, or why none runs while data is at risk."""
    pool, disks = status["name"], status["disks"]
    rebuild = status.get("rebuild") or {}
    lost = [d for d in disks if d["state"] in LOST_STATES and d.get("data_extents")]
    if rebuild.get("state") == "running":
        yield (f"{rebuild.get('reason') or 'a rebuild'} is running "
               f"({rebuild.get('percent', 0):.0f}% done)",
               "wait for it to finish (redundancy is reduced until then)")
        return
    if rebuild.get("state") == "failed":
        yield (f"the last rebuild ({rebuild.get('reason')}) failed: {rebuild.get('failed')} "
               "moves failed", f"see `blockspace pool events {pool}`, then run "
               f"`blockspace pool repair {pool}` again")
    if job is not None and not status.get("mountpoint"):
        yield (f"the {job.get('reason') or job.get('op') or 'disk job'} was interrupted "
               "by the last stop", f"mount the pool to resume it (`blockspace mount {pool} "
               "MOUNTPOINT`)")
        return
    if not lost:
        return
    in_service = [d for d in disks if d["state"] in IN_SERVICE]
    short = [(v["name"], width) for v in status["volumes"]
             if v["state"] != "online" and (width := volume_width(v, status)) > len(in_service)]
    needed = sum(d["data_extents"] for d in lost)
    spare = sum(d["free_extents"] for d in in_service)
    if short:
        name, width = short[0]
        yield (f"automatic repair is not running: no spare capacity to rebuild onto (volume "
               f"{name} needs {width} disks, {len(in_service)} in service)",
               f"add a disk (`blockspace disk add {pool} DISK`) or replace the lost one")
    elif spare < needed:
        yield (f"automatic repair is not running: no spare capacity to rebuild onto "
               f"({needed} extents to rebuild, {spare} free on the disks in service)",
               f"add a disk (`blockspace disk add {pool} DISK`) or replace the lost one")
    elif not status.get("mountpoint"):
        yield ("automatic repair is not running: the pool is not mounted",
               f"mount the pool, or run `blockspace pool repair {pool}`")
    else:
        yield ("automatic repair is not running",
               f"start it: `blockspace pool repair {pool}`")


def volume_width(volume: dict[str, Any], status: dict[str, Any]) -> int:
    """How many disks each slab of `volume` spans (its footprint over its slabs)."""
    slabs, slab_size = volume.get("slabs") or 0, status.get("slab_size") or 0
    return int(volume["footprint"] // (slabs * slab_size)) if slabs and slab_size else 0


def _fullness(status: dict[str, Any], limits: Thresholds) -> Iterable[tuple[str, str]]:
    raw = status.get("raw_size") or 0
    used = sum(d["used_bytes"] for d in status["disks"])
    if raw and 100.0 * used / raw >= limits.pool_full_percent:
        yield (f"the pool is {100.0 * used / raw:.0f}% allocated (threshold "
               f"{limits.pool_full_percent}%)",
               f"add disks (`blockspace disk add {status['name']} DISK`) or delete volumes "
               "or snapshots of data no longer needed")


def thin_overcommit(status: dict[str, Any], percent: int) -> list[tuple[str, int, int]]:
    """(resiliency, promised, capacity) for each resiliency whose thin volumes promise more
    than `percent`% of what they can ever hold: what they allocated plus what still fits."""
    promised: dict[str, int] = {}
    allocated: dict[str, int] = {}
    for v in status["volumes"]:
        if v.get("provisioning") != "thin":
            continue
        key = resiliency_key(v["layout"])
        promised[key] = promised.get(key, 0) + v["size"]
        allocated[key] = allocated.get(key, 0) + v["allocated"]
    found = []
    for key, size in sorted(promised.items()):
        capacity = allocated[key] + (status["usable"].get(key) or 0)
        if size * 100 > capacity * percent:
            found.append((key, size, capacity))
    return found


def _overcommit(status: dict[str, Any], limits: Thresholds) -> Iterable[tuple[str, str]]:
    for key, promised, capacity in thin_overcommit(status, limits.thin_overcommit_percent):
        yield (f"thin {key} volumes promise {format_size(promised)}, more than "
               f"{limits.thin_overcommit_percent}% of the {format_size(capacity)} they can "
               "hold", "add disks before the volumes fill up (a full pool fails their writes)")


def advise(status: dict[str, Any], limits: Thresholds, job: dict[str, Any] | None = None
           ) -> Advice:
    """The `status` sentence and the actions of a pool status document; the actions already
    in the document (a full host file system) come first."""
    findings = [*_disk_findings(status["disks"], status["name"])]
    if status["health"] == "degraded" and any(v["state"] == "degraded"
                                              for v in status["volumes"]):
        findings.append(("redundancy is degraded: some volumes have lost copies", ""))
    if status["health"] == "failed":
        findings.append(("data is lost: some volumes have lost more copies than they "
                         "tolerate", "restore the affected volumes from a backup"))
    findings += [*_repair_findings(status, job), *_fullness(status, limits),
                 *_overcommit(status, limits)]
    text = "; ".join(what for what, _ in findings)
    if not text:
        text = "the pool is online; no action needed" if not status.get("actions") else \
            "the pool needs attention"
    actions = list(status.get("actions") or [])
    for _, action in findings:
        if action and action not in actions:
            actions.append(action)
    return Advice(text, actions)
