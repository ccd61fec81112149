"""Per-volume I/O counters of the served files (FUSE and NBD alike): operations, bytes,
errors and a latency histogram per kind of request, in plain ints and floats.

Counting is the hot path's only cost (a clock read, a bisect, a few additions); everything
else — rates for `iostat`, the Prometheus families — is computed from `snapshot()` by the
reader, at the time it asks."""

import time
from dataclasses import dataclass, field
from typing import Any

from blockspace.latency import LATENCY_BUCKETS, OpCounter

KINDS = ("read", "write", "flush")

@dataclass(slots=True)
class VolumeIO:
    read: OpCounter = field(default_factory=OpCounter)
    write: OpCounter = field(default_factory=OpCounter)
    flush: OpCounter = field(default_factory=OpCounter)

    def to_dict(self) -> dict[str, Any]:
        return {kind: getattr(self, kind).to_dict() for kind in KINDS}


class IoStats:
    """The counters of every served volume since the daemon started."""

    def __init__(self) -> None:
        self.volumes: dict[str, VolumeIO] = {}
        self.started = time.monotonic()

    def volume(self, name: str) -> VolumeIO:
        io = self.volumes.get(name)
        if io is None:
            io = self.volumes[name] = VolumeIO()
        return io

    def forget(self, name: str) -> None:
        self.volumes.pop(name, None)

    def snapshot(self) -> dict[str, Any]:
        return {"uptime": time.monotonic() - self.started,
                "latency_buckets": list(LATENCY_BUCKETS),
                "volumes": {name: io.to_dict() for name, io in sorted(self.volumes.items())}}


def cumulative(buckets: list[int]) -> list[int]:
    """Prometheus' buckets: requests that took at most each bound (the last: all of them)."""
    total = 0
    result = []
    for count in buckets:
        total += count
        result.append(total)
    return result
