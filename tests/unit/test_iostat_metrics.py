"""The I/O counters, the iostat rates computed from two snapshots, and the Prometheus
families of a snapshot (names, labels, values, histogram buckets)."""

from typing import Any

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry

from blockspace.errors import InvalidInput
from blockspace.latency import LATENCY_BUCKETS, OpCounter
from blockspace.service.iostat import report
from blockspace.service.iostats import IoStats, cumulative
from blockspace.service.metrics import SnapshotCollector
from blockspace.service.metrics_address import parse_metrics_address


def test_a_counter_puts_each_request_in_its_latency_bucket() -> None:
    counter = OpCounter()
    counter.add(4096, 0.00005, False)  # under the first bound
    counter.add(4096, 0.0001, False)  # on a bound: that bucket (Prometheus' le)
    counter.add(0, 0.003, True)
    counter.add(8192, 99.0, False)  # slower than every bound: +Inf
    assert counter.ops == 4
    assert counter.bytes == 16384
    assert counter.errors == 1
    assert counter.buckets[0] == 2
    assert counter.buckets[LATENCY_BUCKETS.index(0.005)] == 1
    assert counter.buckets[-1] == 1
    assert cumulative(counter.buckets)[-1] == 4
    assert counter.seconds == pytest.approx(99.00315)


def disk_latency(requests: int) -> dict[str, Any]:
    counter = OpCounter()
    for _ in range(requests):
        counter.add(0, 0.002, False)
    return counter.to_dict()


def snapshot(uptime: float, reads: int, read_bytes: int, seconds: float,
             disk_reads: int) -> dict[str, Any]:
    io = IoStats()
    volume = io.volume("v")
    for _ in range(reads):
        volume.read.add(read_bytes // reads, seconds / reads, False)
    snap = io.snapshot()
    snap["uptime"] = uptime
    snap["volumes"]["v"]["size"] = 1 << 30
    snap.update(pool="tank", capacity={"raw_bytes": 100, "free_bytes": 40,
                                       "allocated_bytes": 60, "volume_bytes": 1 << 30},
                rebuild={"state": "running", "percent": 50.0, "bytes_moved": 7},
                scrub={"state": "done", "percent": 100.0, "bytes_checked": 9},
                tiers={"t": {"reads": 10, "ssd_hits": 9}},
                disks=[{"id": 0, "path": "/d0", "state": "online", "reads": disk_reads,
                        "writes": 0, "bytes_read": disk_reads * 4096, "bytes_written": 0,
                        "flushes": 0, "device_errors": 0, "read_errors": 1, "write_errors": 0,
                        "checksum_errors": 2, "size": 1 << 30, "extents": 10,
                        "latency": disk_latency(disk_reads)}])
    return snap


def test_iostat_rates_between_two_snapshots() -> None:
    first = snapshot(10.0, 100, 100 * 4096, 0.1, 50)
    second = snapshot(12.0, 300, 300 * 4096, 0.3, 250)
    since_mount = report(first, None)
    (v,) = since_mount["volumes"]
    assert v["read_ops"] == pytest.approx(10.0)
    assert v["write_ops"] == 0
    assert v["read_latency"] == pytest.approx(0.001)
    assert v["write_latency"] is None
    step = report(second, first)
    (v,) = step["volumes"]
    assert step["interval"] == pytest.approx(2.0)
    assert v["read_ops"] == pytest.approx(100.0)
    assert v["read_bytes"] == pytest.approx(100 * 4096)
    assert v["read_latency"] == pytest.approx(0.001)
    (d,) = step["disks"]
    assert d["read_ops"] == pytest.approx(100.0)
    assert d["errors"] == 0
    assert d["latency"] == pytest.approx(0.002)
    assert step["total"]["read_ops"] == pytest.approx(100.0)
    # A counter that went backwards (a disk re-opened) counts from zero, never negative.
    reset = report(snapshot(14.0, 300, 300 * 4096, 0.3, 20), second)
    assert reset["disks"][0]["read_ops"] == pytest.approx(10.0)


def scrape(snap: dict[str, Any]) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(lambda: snap))
    text = generate_latest(registry).decode()
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = \
                sample.value
    return samples


def key(**labels: str) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(labels.items()))


def test_metrics_names_labels_and_values() -> None:
    samples = scrape(snapshot(5.0, 3, 3 * 4096, 0.03, 8))
    disk = {"pool": "tank", "disk": "0", "path": "/d0"}
    assert samples["blockspace_disk_reads_total"][key(**disk)] == 8
    assert samples["blockspace_disk_read_bytes_total"][key(**disk)] == 8 * 4096
    assert samples["blockspace_disk_errors_total"][key(**disk, kind="checksum")] == 2
    assert samples["blockspace_disk_errors_total"][key(**disk, kind="read")] == 1
    assert samples["blockspace_disk_state"][key(**disk, state="online")] == 1
    assert samples["blockspace_disk_state"][key(**disk, state="failed")] == 0
    vol = key(pool="tank", volume="v")
    assert samples["blockspace_volume_reads_total"][vol] == 3
    assert samples["blockspace_volume_read_bytes_total"][vol] == 3 * 4096
    assert samples["blockspace_volume_read_latency_seconds_sum"][vol] == pytest.approx(0.03)
    assert samples["blockspace_volume_read_latency_seconds_count"][vol] == 3
    assert samples["blockspace_volume_size_bytes"][vol] == 1 << 30
    pool = key(pool="tank")
    assert samples["blockspace_pool_allocated_bytes"][pool] == 60
    assert samples["blockspace_pool_raw_bytes"][pool] == 100
    assert samples["blockspace_rebuild_running"][pool] == 1
    assert samples["blockspace_rebuild_progress_ratio"][pool] == 0.5
    assert samples["blockspace_scrub_running"][pool] == 0
    assert samples["blockspace_tier_hit_ratio"][key(pool="tank", volume="t")] == 0.9
    assert samples["blockspace_disk_request_latency_seconds_count"][key(**disk)] == 8
    assert samples["blockspace_disk_request_latency_seconds_bucket"][key(**disk, le="0.0025")] \
        == 8
    assert samples["blockspace_disk_request_latency_seconds_bucket"][key(**disk, le="0.001")] \
        == 0
    buckets = samples["blockspace_volume_write_latency_seconds_bucket"]
    assert len(buckets) == len(LATENCY_BUCKETS) + 1


def test_a_scrape_without_a_snapshot_is_empty() -> None:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(lambda: None))
    assert generate_latest(registry) == b""


@pytest.mark.parametrize(("text", "expected"), [
    ("127.0.0.1:9469", ("127.0.0.1", 9469)), (":9469", ("127.0.0.1", 9469)),
    ("[::1]:80", ("::1", 80)),
])
def test_metrics_address(text: str, expected: tuple[str, int]) -> None:
    assert parse_metrics_address(text) == expected


@pytest.mark.parametrize("text", ["9469", "host:", "host:http", "h:0", "h:70000"])
def test_bad_metrics_address(text: str) -> None:
    with pytest.raises(InvalidInput, match="--metrics takes HOST:PORT"):
        parse_metrics_address(text)
