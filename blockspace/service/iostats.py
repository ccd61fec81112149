"""Per-volume I/O counters of the served files (FUSE and NBD alike): operations, bytes,
errors and a latency histogram per kind of request, in plain ints and floats.

Counting is the hot path's only cost (a clock read, a bisect, a few additions); everything
else — rates for `iostat`, the Prometheus families — is computed from `snapshot()` by the
reader, at the time it asks."""

import time
from bisect import bisect_left
from dataclasses import dataclass, field
from typing import Any

# Histogram bucket upper bounds, seconds (Prometheus' `le`); the last bucket is +Inf.
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                   0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
KINDS = ("read", "write", "flush")


@dataclass(slots=True)
class OpCounter:
    ops: int = 0
    bytes: int = 0
    errors: int = 0
    seconds: float = 0.0  # summed latency
    # buckets[i]: requests that took at most LATENCY_BUCKETS[i] (and more than the one
    # before); the last entry: slower than all of them. Not cumulative.
    buckets: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))

    def add(self, nbytes: int, seconds: float, failed: bool) -> None:
        self.ops += 1
        self.bytes += nbytes
        self.seconds += seconds
        self.buckets[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        if failed:
            self.errors += 1

    def to_dict(self) -> dict[str, Any]:
        return {"ops": self.ops, "bytes": self.bytes, "errors": self.errors,
                "seconds": self.seconds, "buckets": list(self.buckets)}


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
