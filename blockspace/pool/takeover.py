"""Who may start writing a pool, from the leases on its disks: the pure half of the one-writer
rule (the I/O, reading and beating the leases, is blockspace/pool/lease.py).

Per disk:
- no lease, or a released one: take it;
- our own (same host, same process): take it;
- held by another process of this host: take it if that process is gone (another boot, or
  no process with that pid and start time), else refuse;
- held by another host: nothing here can tell whether it is alive, so wait the take-over
  timeout and read it again (`after_wait`): taken if its heartbeat did not move, refused if
  it did;
- unreadable (damaged, or a read error): treated like another host's, by its bytes.
`force` takes every lease at once: for a holder known to be dead (its host powered off).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from blockspace.ondisk.lease import Holder, Lease

Verdict = Literal["take", "wait", "refuse"]
_RANK: dict[Verdict, int] = {"take": 0, "wait": 1, "refuse": 2}


@dataclass(frozen=True)
class Reading:
    """The lease block of one disk as read: the lease (None: no lease of this pool there),
    or why it could not be read, a digest of its bytes (to see whether it changed), and, for
    a lease of this host, whether its process still runs."""

    disk_id: int
    lease: Lease | None
    damage: str | None = None
    digest: int = 0
    alive: bool = False

    def same_as(self, other: Reading) -> bool:
        return (self.lease, self.damage, self.digest) == (other.lease, other.damage,
                                                          other.digest)


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    reason: str


def judge(reading: Reading, me: Holder, *, force: bool = False) -> Decision:
    """What one disk's lease allows at first sight."""
    disk = f"disk {reading.disk_id}"
    if force:
        return Decision("take", f"{disk}: taken by force")
    if reading.damage is not None:
        return Decision("wait", f"{disk}: its lease is unreadable ({reading.damage})")
    lease = reading.lease
    if lease is None or not lease.held:
        return Decision("take", f"{disk}: no lease held")
    holder = lease.holder
    if holder == me:
        return Decision("take", f"{disk}: our own lease")
    if holder.same_host(me):
        if holder.boot_id == me.boot_id and reading.alive:
            return Decision("refuse", f"{disk}: its lease is held by pid {holder.pid} on this "
                                      "host, which is running")
        return Decision("take", f"{disk}: its holder, pid {holder.pid} on this host, is gone")
    return Decision("wait", f"{disk}: its lease is held by {holder.describe()}")


def watch_time(readings: list[Reading], me: Holder, minimum: float) -> float:
    """How long to watch before `after_wait`: our take-over timeout, or longer where a
    holder says its beats may be further apart (a long I/O timeout)."""
    asked = [r.lease.wait for r in readings
             if r.lease is not None and r.lease.held and not r.lease.holder.same_host(me)]
    return max([minimum, *asked])


def _worst(decisions: list[Decision]) -> Decision:
    if not decisions:
        return Decision("take", "no disk to hold a lease")
    return max(decisions, key=lambda d: _RANK[d.verdict])


def first_look(readings: list[Reading], me: Holder, *, force: bool = False) -> Decision:
    """The pool's verdict: refused if any disk refuses, waiting if any must be watched."""
    return _worst([judge(r, me, force=force) for r in readings])


def after_wait(
    before: list[Reading], after: list[Reading], me: Holder, *, waited: float,
    force: bool = False,
) -> Decision:
    """The verdict once the take-over timeout has passed between two readings: a lease
    that still needs watching is taken only if nothing about it changed meanwhile."""
    earlier = {r.disk_id: r for r in before}
    decisions = []
    for reading in after:
        decision = judge(reading, me, force=force)
        if decision.verdict == "wait":
            previous = earlier.get(reading.disk_id)
            if previous is not None and previous.same_as(reading):
                decision = Decision("take", f"{decision.reason}, and it did not change for "
                                            f"{waited:g}s")
            else:
                decision = Decision("refuse", f"{decision.reason}, and it is being beaten "
                                              f"(it changed within {waited:g}s)")
        decisions.append(decision)
    return _worst(decisions)
