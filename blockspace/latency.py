"""Counting requests with their latency, in plain ints (a histogram of fixed buckets): what
the volumes' files and the disks' worker requests keep, and `iostat` and the metrics read."""

from bisect import bisect_left
from dataclasses import dataclass, field
from typing import Any

# Histogram bucket upper bounds, seconds (Prometheus' `le`); the last bucket is +Inf.
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                   0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


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
